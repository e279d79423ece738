"""The docs' client examples are files under docs/examples/, and the docs show them verbatim.

A fenced code block preceded by the line `<!-- example: PATH -->` must equal that file of
the repository (an example, or a manifest the Kubernetes quickstart uses); every file in
docs/examples/ must be shown somewhere. `check` verifies both, so a
doc and the example .ci/docs-examples runs cannot drift apart.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARK = re.compile(r"^<!-- example: ((?:docs/examples|deploy/kubernetes)/[A-Za-z0-9_./-]+) -->$")


def blocks(doc):
    lines = doc.read_text().splitlines()
    for i, line in enumerate(lines):
        m = MARK.match(line)
        if not m:
            continue
        fence = lines[i + 1] if i + 1 < len(lines) else ""
        if not fence.startswith("```"):
            yield m.group(1), None, i + 1
            continue
        end = next((j for j in range(i + 2, len(lines)) if lines[j] == "```"), None)
        body = None if end is None else "\n".join(lines[i + 2:end]) + "\n"
        yield m.group(1), body, i + 1


def main():
    errors = []
    shown = set()
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        for name, body, line in blocks(doc):
            where = f"{doc.relative_to(ROOT)}:{line}"
            path = ROOT / name
            shown.add(name)
            if not path.is_file():
                errors.append(f"{where}: {name} does not exist")
            elif body is None:
                errors.append(f"{where}: the marker is not followed by a closed ``` block")
            elif body != path.read_text():
                errors.append(f"{where}: the block differs from {name}; paste the file again")
    for path in sorted((ROOT / "docs" / "examples").rglob("*")):
        name = str(path.relative_to(ROOT))
        if path.is_file() and name not in shown:
            errors.append(f"{name} is shown in no doc (mark a block with <!-- example: {name} -->)")
    for e in errors:
        print(f"docs-examples: {e}", file=sys.stderr)
    print(f"docs-examples: {len(shown)} examples shown verbatim, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
