"""Checks on rendered Kubernetes manifests that a schema cannot express: the properties
docs/operations.md promises about the sidekey sidecar. Run by .ci/deploy-checks with the
rendered overlay files as arguments; prints one line per problem and exits 1 if any.
"""

import re
import sys

import yaml

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def seconds(duration):
    """humantime-style duration, the forms the manifests use: 20s, 1m, 1m30s, 500ms."""
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*(ms|s|m|h)", duration):
        total += int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def check_container(where, c, sidecar):
    image = c.get("image", "")
    name_part = image.rsplit("/", 1)[-1]
    if "@sha256:" not in image and (":" not in name_part or name_part.endswith(":latest")):
        problem(where, f"image {image!r} is not pinned to a tag or digest")
    sc = c.get("securityContext") or {}
    expected = {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
    }
    for field, value in expected.items():
        if sc.get(field) != value:
            problem(where, f"securityContext.{field} must be {str(value).lower()}")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problem(where, "securityContext.capabilities.drop must include ALL")
    if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problem(where, "securityContext.seccompProfile.type must be RuntimeDefault")
    if not (c.get("resources") or {}).get("limits", {}).get("memory"):
        problem(where, "a memory limit is required")
    if sidecar:
        check_sidekey(where, c)


def check_sidekey(where, c):
    if c.get("restartPolicy") != "Always":
        problem(where, "sidekey must be a native sidecar (initContainer, restartPolicy: Always)")
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
        if got != path:
            problem(where, f"{probe} must GET {path} (has {got!r})")
    env = {e["name"]: e.get("value") for e in c.get("env") or []}
    admin = env.get("SIDEKEY_ADMIN_LISTEN", "")
    if not admin.startswith("0.0.0.0:") and not admin.startswith("[::]:"):
        problem(where, "SIDEKEY_ADMIN_LISTEN must bind all addresses: the kubelet probes the pod IP")
    if env.get("SIDEKEY_PROXY_LISTEN", "127.0.0.1:8080").split(":")[0] != "127.0.0.1":
        problem(where, "the proxy must stay on loopback")
    if env.get("SIDEKEY_STORE") == "etcd":
        check_fleet(where, c, env)
    mounts = c.get("volumeMounts") or []
    for m in mounts:
        if m.get("subPath"):
            problem(where, f"mount {m['name']} uses subPath: Secret updates would not reach it")


def check_fleet(where, c, env):
    """Fleet mode (docs/operations.md, "Fleet mode"): what sidekey refuses at start, caught
    before a rollout, and no etcd password in the manifest."""
    if "SIDEKEY_TENANTS_FILE" in env:
        problem(where, "fleet mode (SIDEKEY_STORE=etcd) refuses SIDEKEY_TENANTS_FILE")
    if "SIDEKEY_ETCD_ENDPOINTS" not in env:
        problem(where, "fleet mode needs SIDEKEY_ETCD_ENDPOINTS")
    if "SIDEKEY_MASTER_KEY_FILE" not in env and "SIDEKEY_MASTER_KEY" not in env:
        problem(where, "fleet mode needs the fleet's master key (SIDEKEY_MASTER_KEY_FILE)")
    for e in c.get("env") or []:
        if e["name"] in ("SIDEKEY_ETCD_PASSWORD", "SIDEKEY_MASTER_KEY") and "value" in e:
            problem(where, f"{e['name']} must come from a Secret (valueFrom), not a value")
    endpoints = (env.get("SIDEKEY_ETCD_ENDPOINTS") or "").split(",")
    if any(e.startswith("http://") for e in endpoints):
        problem(where, "etcd endpoints must be https:// (the records are sealed, the "
                "password and client identity are not)")


def check_pod(where, spec):
    sidecars = [c for c in spec.get("initContainers") or [] if c.get("name") == "sidekey"]
    if not sidecars:
        problem(where, "no sidekey initContainer")
    for c in spec.get("initContainers") or []:
        check_container(f"{where} initContainer {c['name']}", c, c.get("name") == "sidekey")
    for c in spec.get("containers") or []:
        if c.get("name") == "sidekey":
            problem(where, "sidekey must be an initContainer, not an app container")
        check_container(f"{where} container {c['name']}", c, False)
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True or (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problem(where, "pod securityContext must set runAsNonRoot and seccompProfile RuntimeDefault")
    for c in sidecars:
        env = {e["name"]: e.get("value") for e in c.get("env") or []}
        grace = seconds(env.get("SIDEKEY_SHUTDOWN_GRACE") or "20s")
        budget = spec.get("terminationGracePeriodSeconds", 30)
        if budget <= grace:
            problem(where, f"terminationGracePeriodSeconds {budget} must exceed sidekey's shutdown grace {grace:g}s")


def main(paths):
    for path in paths:
        kinds = set()
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
                kinds.add(kind)
                where = f"{path} {kind}/{name}"
                if kind in ("Deployment", "StatefulSet", "DaemonSet"):
                    check_pod(where, doc["spec"]["template"]["spec"])
        if "NetworkPolicy" not in kinds:
            problem(path, "no NetworkPolicy")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
