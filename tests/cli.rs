//! The `sidekey` binary driven as a user would: `serve` in a child process, the client
//! commands against it, a crash (SIGKILL) and restarts.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

mod support;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_KEY: &str = "HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=";
const ORG: &str = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sidekey"))
}

struct Server {
    child: Child,
    socket: PathBuf,
    log: mpsc::Receiver<String>,
    /// The "sidekey ready" line, naming the addresses bound.
    ready: String,
    /// Reads the server's stderr into `log` until `log` is dropped or stderr ends.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Starts `sidekey serve` and waits for its ready line (or its exit).
fn serve(dir: &Path, key: &str) -> Result<Server, String> {
    serve_with(dir, key, &[], "info")
}

fn serve_with(dir: &Path, key: &str, extra: &[&str], rust_log: &str) -> Result<Server, String> {
    serve_with_env(dir, key, extra, rust_log, &[])
}

fn serve_with_env(
    dir: &Path,
    key: &str,
    extra: &[&str],
    rust_log: &str,
    env: &[(&str, &str)],
) -> Result<Server, String> {
    let socket = dir.join("grpc.sock");
    let mut command = bin();
    command
        .args([
            "serve",
            "--proxy-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(extra);
    // A test may give its own --grpc-listen (a TCP one); the socket is the default.
    if !extra.contains(&"--grpc-listen") {
        command
            .arg("--grpc-listen")
            .arg(format!("unix:{}", socket.display()));
    }
    let mut child = command
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("SIDEKEY_MASTER_KEY", key)
        .env("RUST_LOG", rust_log)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sidekey serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    // The timeout only bounds a hung start; readiness itself is the log line.
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(60)) {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("sidekey ready") {
            return Ok(Server {
                child,
                socket,
                log: rx,
                ready: line,
                reader: Some(reader),
            });
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(seen)
}

impl Server {
    fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None)
    }

    fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = bin()
            .args(args)
            .arg("--server")
            .arg(format!("unix:{}", self.socket.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    fn crash(mut self) -> String {
        self.child.kill().unwrap(); // SIGKILL: no clean shutdown
        self.child.wait().unwrap();
        // The reader thread ends at EOF, closing the channel: every line is collected.
        let log = std::mem::replace(&mut self.log, mpsc::channel().1);
        log.iter().collect::<Vec<_>>().join("\n")
    }
}

/// A log collector that goes away (the read end of serve's stderr closed) must not take the
/// proxy or the control plane down with it: every later log line fails with EPIPE.
#[test]
fn serve_keeps_working_after_its_stderr_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve_with(dir.path(), KEY, &[], "debug").unwrap();
    let create = |server: &Server, id: &str| {
        server.cli_with_stdin(
            &[
                "tenants",
                "create",
                id,
                "--miradore-site",
                "acme",
                "--miradore-api-key-file",
                "-",
            ],
            Some("1_AaDf234sdf8!4"),
        )
    };
    // Stop collecting: the reader thread ends at the next line it cannot hand over, and its
    // end closes the pipe's read end.
    drop(std::mem::replace(&mut server.log, mpsc::channel().1));
    stdout(&create(&server, "first"));
    server.reader.take().unwrap().join().unwrap();
    for id in ["second", "third", "fourth"] {
        stdout(&create(&server, id));
    }
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "serve exited after its stderr closed"
    );
}

/// A server a test did not crash itself must not outlive the test.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    assert!(!o.status.success(), "command unexpectedly succeeded");
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn operator_workflow_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), KEY).unwrap();

    // Secret from stdin; the table shows a fingerprint, never the key.
    let out = stdout(&server.cli_with_stdin(
        &[
            "tenants",
            "create",
            "acme",
            "--display-name",
            "Acme",
            "--miradore-site",
            "AcmeSite",
            "--miradore-api-key-file",
            "-",
        ],
        Some("1_AaDf234sdf8!4\n"),
    ));
    assert!(out.contains("AcmeSite") && out.contains("sha256:"), "{out}");
    assert!(!out.contains("1_AaDf234sdf8!4"));

    // Secret from an environment variable; JSON output for scripts.
    let mut cmd = bin();
    let out = cmd
        .args([
            "tenants",
            "update",
            "acme",
            "--m3ter-access-key-id",
            "AK",
            "--m3ter-org-id",
            ORG,
        ])
        .args([
            "--m3ter-api-secret-env",
            "ACME_SECRET",
            "-o",
            "json",
            "--server",
        ])
        .arg(format!("unix:{}", server.socket.display()))
        .env("ACME_SECRET", "m3ter-secret-value")
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["m3ter"]["accessKeyId"], "AK");
    assert_eq!(json["miradore"]["site"], "AcmeSite");
    assert!(
        json["m3ter"]["apiSecret"]["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(!json.to_string().contains("m3ter-secret-value"));

    // apply -f: a YAML document creates a second tenant.
    let doc = dir.path().join("beta.yaml");
    std::fs::write(
        &doc,
        "id: beta\nmailkit:\n  clientId: \"77\"\n  clientMd5: { value: 0123456789abcdef0123456789abcdef }\n",
    )
    .unwrap();
    stdout(&server.cli(&["tenants", "apply", "-f", doc.to_str().unwrap()]));
    let list = stdout(&server.cli(&["tenants", "list"]));
    assert!(
        list.contains("acme") && list.contains("beta") && list.contains("mailkit"),
        "{list}"
    );

    // Crash without a clean shutdown, restart: every acknowledged write is there.
    server.crash();
    let server = serve(dir.path(), KEY).unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &server.cli(&["tenants", "get", "acme", "-o", "json"]),
    ))
    .unwrap();
    assert_eq!(json["displayName"], "Acme");
    assert_eq!(json["m3ter"]["orgId"], ORG);
    stdout(&server.cli(&["tenants", "get", "beta"]));

    stdout(&server.cli(&["tenants", "delete", "beta"]));
    let err = stderr(&server.cli(&["tenants", "get", "beta"]));
    assert!(err.contains("not found"), "{err}");
    server.crash();

    // A restart with another master key fails clearly instead of serving garbage.
    let failed = serve(dir.path(), OTHER_KEY).err().expect("must not start");
    assert!(failed.contains("master key"), "{failed}");
}

#[test]
fn one_worker_thread_serves_on_a_current_thread_runtime() {
    // TOKIO_WORKER_THREADS=1 (or one CPU) selects the current-thread runtime: everything,
    // store start-up and the control plane included, must still work on it.
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_env(
        dir.path(),
        KEY,
        &[],
        "info",
        &[("TOKIO_WORKER_THREADS", "1")],
    )
    .unwrap();
    stdout(&server.cli_with_stdin(
        &[
            "tenants",
            "create",
            "solo",
            "--miradore-site",
            "Solo1",
            "--miradore-api-key-file",
            "-",
        ],
        Some("solo-key\n"),
    ));
    let shown = stdout(&server.cli(&["tenants", "get", "solo"]));
    assert!(shown.contains("Solo1"), "{shown}");

    for bad in ["0", "many"] {
        let dir = tempfile::tempdir().unwrap();
        let failed = serve_with_env(
            dir.path(),
            KEY,
            &[],
            "info",
            &[("TOKIO_WORKER_THREADS", bad)],
        )
        .err()
        .expect("must not start");
        assert!(failed.contains("TOKIO_WORKER_THREADS"), "{failed}");
    }
}

#[test]
fn validation_failures_are_listed_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), KEY).unwrap();
    let err = stderr(&server.cli(&[
        "tenants",
        "create",
        "Bad_Id",
        "--m3ter-org-id",
        "nope",
        "--mailkit-client-id",
        "x1",
    ]));
    for field in [
        "tenant.id",
        "tenant.m3ter.org_id",
        "tenant.mailkit.client_id",
    ] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
    let err = stderr(&server.cli(&["tenants", "update", "ghost", "--display-name", "x"]));
    assert!(err.contains("not found"), "{err}");
    let err = stderr(&server.cli(&["tenants", "update", "ghost"]));
    assert!(err.contains("nothing to update"), "{err}");
}

#[test]
fn a_server_that_is_not_running_is_reported_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["tenants", "list", "--server"])
        .arg(format!("unix:{}", dir.path().join("none.sock").display()))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(
        err.contains("there is no socket at unix:") && err.contains("sidekey serve"),
        "{err}"
    );
}

#[test]
fn a_missing_or_wrong_token_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "the-right-token\n").unwrap();
    let server = serve_with(
        dir.path(),
        KEY,
        &["--grpc-token-file", token.to_str().unwrap()],
        "info",
    )
    .unwrap();
    let err = stderr(&server.cli(&["tenants", "list"]));
    assert!(
        err.contains("token") && err.contains("--token-file"),
        "{err}"
    );

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "the-wrong-token").unwrap();
    let err = stderr(&server.cli(&["tenants", "list", "--token-file", wrong.to_str().unwrap()]));
    assert!(err.contains("not valid"), "{err}");
    stdout(&server.cli(&["tenants", "list", "--token-file", token.to_str().unwrap()]));
}

#[test]
fn no_secret_reaches_the_log_at_trace_level() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "control-token-xyz").unwrap();
    let server = serve_with(
        dir.path(),
        KEY,
        &["--grpc-token-file", token.to_str().unwrap()],
        "trace",
    )
    .unwrap();
    let t = token.to_str().unwrap();
    let secrets = [
        "1_Ke{y},!+Secret",
        "m3ter-api-secret-42",
        "fedcba9876543210fedcba9876543210",
    ];
    let doc = dir.path().join("acme.yaml");
    std::fs::write(
        &doc,
        format!(
            "id: acme\nmiradore: {{ site: acme, apiKey: {{ value: \"{}\" }} }}\n\
             m3ter: {{ accessKeyId: AK, orgId: {ORG}, apiSecret: {{ value: {} }} }}\n\
             mailkit: {{ clientId: \"7\", clientMd5: {{ value: {} }} }}\n",
            secrets[0], secrets[1], secrets[2]
        ),
    )
    .unwrap();
    stdout(&server.cli(&[
        "tenants",
        "apply",
        "-f",
        doc.to_str().unwrap(),
        "--token-file",
        t,
    ]));
    stdout(&server.cli_with_stdin(
        &[
            "tenants",
            "update",
            "acme",
            "--m3ter-api-secret-file",
            "-",
            "--token-file",
            t,
        ],
        Some(secrets[1]),
    ));
    stdout(&server.cli(&["tenants", "get", "acme", "-o", "json", "--token-file", t]));
    stderr(&server.cli(&[
        "tenants",
        "list",
        "--token-file",
        token.to_str().unwrap().replace("token", "nope").as_str(),
    ]));
    let log = server.crash();
    assert!(
        log.contains("snapshot published"),
        "debug logging was not on: {log}"
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    for s in secrets.iter().chain(&["control-token-xyz"]) {
        for form in [s.to_string(), b64.encode(s), percent(s)] {
            assert!(
                !log.contains(&form),
                "secret form {form:?} found in the log"
            );
        }
    }
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn get_json_edited_and_applied_keeps_secrets_it_shows_by_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), KEY).unwrap();
    stdout(&server.cli_with_stdin(
        &[
            "tenants",
            "create",
            "acme",
            "--m3ter-access-key-id",
            "AK",
            "--m3ter-org-id",
            ORG,
            "--m3ter-api-secret-file",
            "-",
        ],
        Some("kept-secret"),
    ));
    let mut doc: serde_json::Value = serde_json::from_str(&stdout(
        &server.cli(&["tenants", "get", "acme", "-o", "json"]),
    ))
    .unwrap();
    let fingerprint = doc["m3ter"]["apiSecret"]["fingerprint"].clone();
    doc["displayName"] = "Edited".into();
    let file = dir.path().join("acme.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let applied: serde_json::Value = serde_json::from_str(&stdout(&server.cli(&[
        "tenants",
        "apply",
        "-f",
        file.to_str().unwrap(),
        "-o",
        "json",
    ])))
    .unwrap();
    assert_eq!(applied["displayName"], "Edited");
    assert_eq!(
        applied["m3ter"]["apiSecret"]["fingerprint"], fingerprint,
        "secret kept"
    );

    // A fingerprint that is not the stored secret's is refused, not silently applied.
    doc["m3ter"]["apiSecret"]["fingerprint"] = "sha256:000000000000".into();
    std::fs::write(&file, doc.to_string()).unwrap();
    let err = stderr(&server.cli(&["tenants", "apply", "-f", file.to_str().unwrap()]));
    assert!(
        err.contains("m3ter.api_secret") && err.contains("not that of the stored secret"),
        "{err}"
    );

    // Leaving the secret out entirely means "inherit", and there is nothing to inherit.
    doc["m3ter"].as_object_mut().unwrap().remove("apiSecret");
    std::fs::write(&file, doc.to_string()).unwrap();
    let err = stderr(&server.cli(&["tenants", "apply", "-f", file.to_str().unwrap()]));
    assert!(err.contains("tenant.m3ter.api_secret"), "{err}");
}

#[test]
fn apply_errors_name_the_field_and_line_never_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), KEY).unwrap();
    let file = dir.path().join("bad.yaml");
    let fifo = dir.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let cases = [
        (
            "id: acme\nmiradore:\n  site: acme\n  apiKey: \"s3cret-key-1\"\n".to_owned(),
            "miradore.apiKey: has the wrong type",
            "line 4",
        ),
        (
            "id: acme\nmailkit: { clientId: \"1\", clientMd5: { value: [s3cret-key-2] } }\n"
                .to_owned(),
            "mailkit.clientMd5.value",
            "line 2",
        ),
        (
            "id: acme\nmiradore: { site: acme, apiKey: { value: 's3cret-key-3\n".to_owned(),
            "not valid YAML",
            "line",
        ),
        (
            "id: acme\nmiradore: { s3cret-key-4: x }\n".to_owned(),
            "miradore: has a field that is not allowed here",
            "line 2",
        ),
        (
            format!(
                "id: acme\nmiradore: {{ site: acme, apiKey: {{ valueFrom: {{ file: {} }} }} }}\n",
                fifo.display()
            ),
            "not a regular file",
            "miradore.apiKey",
        ),
        (
            "id: acme\nmiradore: { site: acme, apiKey: { valueFrom: { file: /dev/zero } } }\n"
                .to_owned(),
            "not a regular file",
            "miradore.apiKey",
        ),
    ];
    for (text, what, where_) in cases {
        std::fs::write(&file, &text).unwrap();
        let out = server.cli(&["tenants", "apply", "-f", file.to_str().unwrap()]);
        let err = stderr(&out);
        let all = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
        assert!(
            err.contains(what) && err.contains(where_),
            "{text:?}: {err}"
        );
        assert!(!all.contains("s3cret"), "{text:?}: {all}");
    }
    // Through standard input too.
    let out = server.cli_with_stdin(
        &["tenants", "apply", "-f", "-"],
        Some("id: acme\nmiradore: { site: acme, apiKey: \"s3cret-key-5\" }\n"),
    );
    let err = stderr(&out);
    assert!(
        err.contains("miradore.apiKey") && !err.contains("s3cret"),
        "{err}"
    );
}

/// `sidekey store backup` beside a live server, `store verify` of the backup and of the live
/// store, and a restore: stop, copy the backup into place, start.
#[test]
fn backup_of_a_live_store_verifies_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = serve(dir.path(), KEY).unwrap();
    let create = |server: &Server, id: &str| {
        stdout(&server.cli_with_stdin(
            &[
                "tenants",
                "create",
                id,
                "--miradore-site",
                "Site",
                "--miradore-api-key-file",
                "-",
            ],
            Some("miradore-key-for-backup-test\n"),
        ))
    };
    create(&server, "acme");
    create(&server, "beta");

    let backup = dir.path().join("backup.redb");
    let out = bin()
        .args(["store", "backup", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&backup)
        .output()
        .unwrap();
    let line = stdout(&out);
    assert!(line.contains("2 tenants"), "{line}");
    let mode = std::fs::metadata(&backup).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let raw = std::fs::read(&backup).unwrap();
    assert!(
        !contains(&raw, b"miradore-key-for-backup-test"),
        "the backup holds a secret in the clear"
    );

    // A second backup to the same file is refused, not overwritten.
    let again = bin()
        .args(["store", "backup", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&backup)
        .output()
        .unwrap();
    assert!(stderr(&again).contains("already exists"));

    let verify = |file: &Path, key: &str| {
        bin()
            .args(["store", "verify", "--data-dir"])
            .arg(&data)
            .arg("--file")
            .arg(file)
            .env("SIDEKEY_MASTER_KEY", key)
            .output()
            .unwrap()
    };
    let line = stdout(&verify(&backup, KEY));
    assert!(
        line.contains("every record authenticates") && line.contains("2 tenants"),
        "{line}"
    );
    // The live store verifies too, while the server runs.
    stdout(&verify(&data.join("sidekey.redb"), KEY));
    // Under another key, verify fails non-zero and says why.
    let err = stderr(&verify(&backup, OTHER_KEY));
    assert!(err.contains("master key does not match"), "{err}");

    // Writes after the backup are lost by a restore, as they should be.
    create(&server, "gamma");
    drop(server);
    std::fs::copy(&backup, data.join("sidekey.redb")).unwrap();
    let server = serve(dir.path(), KEY).unwrap();
    let list = stdout(&server.cli(&["tenants", "list"]));
    assert!(list.contains("acme") && list.contains("beta"), "{list}");
    assert!(!list.contains("gamma"), "{list}");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// After `kill -9` the file needs the repair redb makes when serve opens it: `store verify`
/// says so (exit 1) instead of guessing; after a start and a clean stop it verifies.
#[test]
fn verify_after_a_crash_asks_for_a_start_then_passes_after_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let verify = || {
        bin()
            .args(["store", "verify", "--data-dir"])
            .arg(&data)
            .env("SIDEKEY_MASTER_KEY", KEY)
            .output()
            .unwrap()
    };
    let server = serve(dir.path(), KEY).unwrap();
    stdout(
        &server.cli_with_stdin(
            &["tenants", "create", "acme", "--miradore-site", "S"]
                .into_iter()
                .chain(["--miradore-api-key-file", "-"])
                .collect::<Vec<_>>(),
            Some("key-value-for-crash-test\n"),
        ),
    );
    server.crash();
    let err = stderr(&verify());
    assert!(
        err.contains("not closed cleanly") && err.contains("start sidekey"),
        "{err}"
    );

    let mut server = serve(dir.path(), KEY).unwrap();
    let term = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(server.child.wait().unwrap().success());
    let line = stdout(&verify());
    assert!(line.contains("1 tenant,"), "{line}");
}

/// `truncate -s 0 sidekey.redb` on a store with tenants: serve refuses to start, says what it
/// found and what to do, exits 1, and leaves the file as it was (never a new, empty store).
#[test]
fn an_emptied_store_file_stops_serve_instead_of_starting_empty() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), KEY).unwrap();
    stdout(&server.cli_with_stdin(
        &[
            "tenants",
            "create",
            "acme",
            "--miradore-site",
            "S",
            "--miradore-api-key-file",
            "-",
        ],
        Some("key-value-for-truncate-test\n"),
    ));
    server.crash();
    let file = dir.path().join("data").join("sidekey.redb");
    std::fs::File::create(&file).unwrap(); // truncate -s 0
    let out = bin()
        .args([
            "serve",
            "--proxy-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--grpc-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("SIDEKEY_MASTER_KEY", KEY)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("store file is corrupted") && err.contains("is empty (0 bytes)"),
        "{err}"
    );
    assert!(!err.contains("created a new store"), "{err}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
}

// ---------------------------------------------------------------------------------------
// The client as a new user meets it: --server forms, what a wrong port reads as, exit codes.

impl Server {
    /// The address the ready line gives for `name` (proxy, grpc or admin).
    fn addr(&self, name: &str) -> String {
        let key = format!("{name}=");
        let start = self.ready.find(&key).expect("address in the ready line") + key.len();
        self.ready[start..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    }
}

/// `sidekey ARGS --server SERVER`, with no token.
fn cli_at(server: &str, args: &[&str]) -> Output {
    bin()
        .args(args)
        .args(["--server", server])
        .env_remove("SIDEKEY_SERVER")
        .env_remove("SIDEKEY_CA_FILE")
        .env_remove("SIDEKEY_GRPC_TOKEN")
        .env_remove("SIDEKEY_GRPC_TOKEN_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn exit_code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn failure(o: &Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(exit_code(o), code, "stderr: {err}");
    err
}

#[test]
fn a_tenants_file_interval_of_zero_is_refused() {
    // Zero once started sidekey with a watch that panicked at its first tick: serving, but
    // never reading the file again.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.yaml");
    // A file start-up would refuse (exit 1): were the interval accepted, the test fails on
    // the exit code rather than waiting on a sidekey that serves.
    std::fs::write(&file, "tenants: [\n").unwrap();
    let serve = |flag: &[&str], env: &[(&str, &str)]| {
        bin()
            .args(["serve", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--tenants-file", file.to_str().unwrap()])
            .args(flag)
            .env("SIDEKEY_MASTER_KEY", KEY)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    for output in [
        serve(&["--tenants-file-interval", "0s"], &[]),
        serve(&["--tenants-file-interval", "0ms"], &[]),
        serve(&[], &[("SIDEKEY_TENANTS_FILE_INTERVAL", "0s")]),
    ] {
        let err = failure(&output, 2);
        assert!(
            err.contains("--tenants-file-interval") && err.contains("must be above 0"),
            "{err}"
        );
    }
    let err = failure(&serve(&["--tenants-file-interval", "soon"], &[]), 2);
    assert!(err.contains("--tenants-file-interval"), "{err}");
}

#[test]
fn server_flag_takes_every_form_and_names_what_a_wrong_address_reached() {
    let dir = tempfile::tempdir().unwrap();
    // A host name as a listen address, too.
    let server = serve_with(dir.path(), KEY, &["--grpc-listen", "localhost:0"], "info").unwrap();
    let grpc = server.addr("grpc");
    let authority = grpc.strip_prefix("http://").unwrap();
    assert!(authority.starts_with("127.0.0.1:"), "{}", server.ready);
    let port = authority.rsplit_once(':').unwrap().1;

    for form in [
        authority.to_owned(),
        grpc.clone(),
        format!("{grpc}/"),
        format!("localhost:{port}"),
    ] {
        stdout(&cli_at(&form, &["tenants", "list"]));
    }

    // The admin and proxy ports answer HTTP/2 but not gRPC.
    for plane in ["admin", "proxy"] {
        let err = failure(&cli_at(&server.addr(plane), &["tenants", "list"]), 1);
        assert!(
            err.contains("not gRPC")
                && err.contains("admin or proxy port")
                && err.contains("127.0.0.1:50051"),
            "{plane}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "one sentence: {err}");
    }

    // A closed port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let err = failure(&cli_at(&closed_addr, &["tenants", "list"]), 1);
    assert!(
        err.contains("nothing listens on") && err.contains("connection refused"),
        "{err}"
    );

    // An HTTP/1.1-only web server: answers 400 to the HTTP/2 preface and hangs up.
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_addr = web.local_addr().unwrap().to_string();
    let web_thread = std::thread::spawn(move || {
        use std::io::Read;
        if let Ok((mut conn, _)) = web.accept() {
            conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            );
        }
    });
    let err = failure(&cli_at(&web_addr, &["tenants", "list"]), 1);
    assert!(
        err.contains("not in HTTP/2") && err.contains("https://"),
        "{err}"
    );
    web_thread.join().unwrap();

    // https:// to the plain control plane: no silent fallback to plain text.
    let err = failure(
        &cli_at(&format!("https://{authority}"), &["tenants", "list"]),
        1,
    );
    assert!(
        err.contains("TLS handshake") && err.contains("http://"),
        "{err}"
    );

    // Usage errors: a malformed address, --ca-file without https.
    for bad in [
        "127.0.0.1",
        "ftp://127.0.0.1:1",
        "unix:relative.sock",
        "http://h:1/path",
    ] {
        let err = failure(&cli_at(bad, &["tenants", "list"]), 2);
        assert!(
            err.contains("HOST:PORT") || err.contains("unix:"),
            "{bad}: {err}"
        );
    }
    let err = failure(
        &cli_at(
            authority,
            &["tenants", "list", "--ca-file", "/nonexistent.pem"],
        ),
        2,
    );
    assert!(err.contains("--ca-file applies to an https://"), "{err}");
}

/// A TLS terminator (test CA, ALPN h2) in front of the control plane's socket, as an
/// ingress or service mesh would stand in front of sidekey.
async fn tls_front(ca: &support::TestCa, socket: PathBuf) -> std::net::SocketAddr {
    let (chain, key) = ca.server_cert(&["localhost", "127.0.0.1"]);
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let socket = socket.clone();
            tokio::spawn(async move {
                // A failed handshake (the untrusting client) just ends this connection.
                if let Ok(mut tls) = acceptor.accept(tcp).await
                    && let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut unix).await;
                }
            });
        }
    });
    addr
}

#[test]
fn https_server_is_verified_with_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), KEY).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = support::TestCa::new("sidekey control-plane test CA");
    let front = runtime.block_on(tls_front(&ca, server.socket.clone()));
    let url = format!("https://localhost:{}", front.port());

    // Not trusted without the CA: refused, and the sentence says what to give.
    let err = failure(&cli_at(&url, &["tenants", "list"]), 1);
    assert!(
        err.contains("not trusted") && err.contains("--ca-file"),
        "{err}"
    );

    let ca_file = ca.pem_file();
    let ca_file = ca_file.to_str().unwrap();
    stdout(&cli_at(
        &url,
        &[
            "tenants",
            "create",
            "tls-ok",
            "--ca-file",
            ca_file,
            "-o",
            "json",
        ],
    ));
    let out = stdout(&cli_at(
        &format!("https://127.0.0.1:{}", front.port()),
        &["tenants", "list", "--ca-file", ca_file],
    ));
    assert!(out.contains("tls-ok"), "{out}");

    // A CA file that holds no certificate is refused before dialling.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = failure(
        &cli_at(
            &url,
            &["tenants", "list", "--ca-file", empty.to_str().unwrap()],
        ),
        1,
    );
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[test]
fn exit_codes_let_scripts_branch_on_not_found_and_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), KEY).unwrap();
    let err = failure(&server.cli(&["tenants", "get", "ghost"]), 3);
    assert!(err.contains("not found"), "{err}");
    failure(&server.cli(&["tenants", "delete", "ghost"]), 3);

    stdout(&server.cli(&["tenants", "create", "acme"]));
    let err = failure(&server.cli(&["tenants", "create", "acme"]), 4);
    assert!(err.contains("exists"), "{err}");
    let err = failure(
        &server.cli(&[
            "tenants",
            "update",
            "acme",
            "--display-name",
            "A",
            "--etag",
            "stale",
        ]),
        4,
    );
    assert!(err.contains("etag"), "{err}");

    // Usage: a flag clap refuses, and an update with nothing to change.
    failure(&server.cli(&["tenants", "list", "--no-such-flag"]), 2);
    failure(&server.cli(&["tenants", "update", "acme"]), 2);
    // A refused request is a plain failure.
    failure(&server.cli(&["tenants", "create", "Not Valid!"]), 1);
    stdout(&server.cli(&["tenants", "delete", "acme"]));

    for args in [
        &["--help"][..],
        &["tenants", "--help"],
        &["partner", "--help"],
    ] {
        let help = stdout(&bin().args(args).output().unwrap());
        assert!(
            help.contains("3 not found") && help.contains("4 conflict"),
            "{help}"
        );
    }
}

#[test]
fn every_read_command_prints_yaml_and_json() {
    let dir = tempfile::tempdir().unwrap();
    // Vendor calls go to a closed port: `tenants test` fails fast, without the internet.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let connect_to = format!("online.miradore.com:443:127.0.0.1:{port}");
    let server = serve_with(dir.path(), KEY, &["--connect-to", &connect_to], "info").unwrap();
    let key_file = dir.path().join("mira.key");
    std::fs::write(&key_file, "mira-secret-1").unwrap();
    stdout(&server.cli(&[
        "tenants",
        "create",
        "acme",
        "--display-name",
        "Acme",
        "--miradore-site",
        "acme",
        "--miradore-api-key-file",
        key_file.to_str().unwrap(),
    ]));

    let yaml = stdout(&server.cli(&["tenants", "get", "acme", "-o", "yaml"]));
    assert!(
        yaml.contains("id: acme\n") && yaml.contains("site: acme"),
        "{yaml}"
    );
    assert!(!yaml.contains("mira-secret-1"), "{yaml}");
    // The YAML is a document `apply` takes back, the secret kept by its fingerprint.
    let applied = stdout(&server.cli_with_stdin(
        &["tenants", "apply", "-f", "-", "-o", "yaml"],
        Some(&yaml.replace("displayName: Acme", "displayName: Acme Two")),
    ));
    assert!(applied.contains("displayName: Acme Two"), "{applied}");
    let yaml = stdout(&server.cli(&["tenants", "list", "-o", "yaml"]));
    assert!(
        yaml.starts_with("tenants:\n") && yaml.contains("id: acme"),
        "{yaml}"
    );
    stdout(&server.cli(&["partner", "get", "-o", "yaml"]));

    let out = server.cli(&[
        "tenants", "test", "acme", "--vendor", "miradore", "-o", "json",
    ]);
    failure(&out, 1);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["tenant"], "acme");
    assert_eq!(doc["vendor"], "miradore");
    assert_eq!(doc["ok"], false);
    let out = server.cli(&[
        "tenants", "test", "acme", "--vendor", "miradore", "-o", "yaml",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("ok: false") && text.contains("vendor: miradore"),
        "{text}"
    );
    failure(&server.cli(&["tenants", "get", "acme", "-o", "xml"]), 2);
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_sidekey()"),
        ("zsh", "#compdef sidekey"),
        ("fish", "complete -c sidekey"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = stdout(&bin().args(["completions", shell]).output().unwrap());
        assert!(
            out.contains(marker) && out.contains("tenants"),
            "{shell}: {out}"
        );
    }
    let err = failure(&bin().args(["completions", "tcsh"]).output().unwrap(), 2);
    assert!(err.contains("tcsh"), "{err}");
}

/// docs/quickstart-kubernetes.md's tenants file, as the quickstart turns it into a Secret:
/// `serve --tenants-file` applies it, with the key file beside it.
#[test]
fn quickstart_tenants_file_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let secret_dir = dir.path().join("tenants");
    std::fs::create_dir(&secret_dir).unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes/overlays/quickstart/tenants.yaml");
    let text = std::fs::read_to_string(manifest).unwrap();
    // The Secret's mount path in the pod, here a temporary directory.
    assert!(
        text.contains("/etc/sidekey/tenants/acme-miradore-api-key"),
        "{text}"
    );
    let text = text.replace(
        "/etc/sidekey/tenants/",
        &format!("{}/", secret_dir.display()),
    );
    std::fs::write(secret_dir.join("tenants.yaml"), text).unwrap();
    std::fs::write(secret_dir.join("acme-miradore-api-key"), "quickstart-key").unwrap();
    let file = secret_dir.join("tenants.yaml");
    let server = serve_with(
        dir.path(),
        KEY,
        &["--tenants-file", file.to_str().unwrap()],
        "info",
    )
    .unwrap();
    let out = stdout(&server.cli(&["tenants", "get", "acme", "-o", "json"]));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["miradore"]["site"], "acme", "{out}");
    assert!(
        doc["miradore"]["apiKey"]["fingerprint"].is_string(),
        "{out}"
    );
}

/// A gRPC server that is not sidekey (here one serving only grpc.health.v1).
#[test]
fn another_grpc_server_is_named_as_such() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    });
    let err = failure(&cli_at(&addr.to_string(), &["tenants", "list"]), 1);
    assert!(
        err.contains("is a gRPC server, but not sidekey's control plane"),
        "{err}"
    );
}

/// The admin address in the "sidekey ready" line.
fn admin_addr(server: &Server) -> String {
    server
        .ready
        .split_whitespace()
        .find_map(|f| f.strip_prefix("admin="))
        .unwrap_or_else(|| panic!("no admin address in {:?}", server.ready))
        .to_owned()
}

/// `GET path` over HTTP/1.1 with `Connection: close`: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

fn health(args: &[&str], env: &[(&str, &str)]) -> Output {
    bin()
        .arg("health")
        .args(args)
        .env_remove("SIDEKEY_ADMIN_LISTEN")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// A fake admin listener that answers every connection with `response`, or (None) reads
/// the request and never answers.
fn fake_admin(response: Option<&'static str>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(4) {
            let mut conn = conn.unwrap();
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            match response {
                Some(r) => {
                    let _ = conn.write_all(r.as_bytes());
                }
                None => held.push(conn),
            }
        }
    });
    addr
}

#[test]
fn health_exits_0_only_when_ready_with_a_one_line_reason_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), KEY).unwrap();
    let admin = admin_addr(&server);
    let port = admin.rsplit_once(':').unwrap().1.to_owned();

    let ready = health(&["--admin", &admin], &[]);
    assert_eq!(exit_code(&ready), 0, "{}", stderr(&ready));
    assert!(stdout(&ready).contains("ready"));
    // SIDEKEY_ADMIN_LISTEN, as serve reads it in the same container; a wildcard address is
    // asked on loopback.
    let from_env = health(&[], &[("SIDEKEY_ADMIN_LISTEN", &format!("0.0.0.0:{port}"))]);
    assert_eq!(exit_code(&from_env), 0, "{}", stderr(&from_env));

    // Not ready: the reason /readyz gives, on one line.
    let draining = fake_admin(Some(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 42\r\nconnection: close\r\n\r\n\
         not ready: starting or draining\nstore: ok\n",
    ));
    let not_ready = health(&["--admin", &draining], &[]);
    let why = failure(&not_ready, 1);
    assert!(
        why.contains("HTTP 503: not ready: starting or draining"),
        "{why}"
    );
    assert_eq!(why.trim_end().lines().count(), 1, "{why}");

    // Nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let refused = health(&["--admin", &closed], &[]);
    let why = failure(&refused, 1);
    assert!(why.contains("cannot reach the admin listener"), "{why}");

    // A listener that never answers: the check's own deadline ends it.
    let silent = fake_admin(None);
    let started = std::time::Instant::now();
    let hung = health(&["--admin", &silent], &[]);
    let why = failure(&hung, 1);
    assert!(why.contains("did not answer"), "{why}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));

    // A wrong address is a usage error.
    assert_eq!(exit_code(&health(&["--admin", "nowhere"], &[])), 2);
    drop(server);
}

/// After a restart every series that start-up can set is there: the tenants gauge reflects
/// the tenants loaded, the tenants file's start-up apply is counted, and the outcomes not
/// seen yet are exported at 0 (so `rate()` sees their first increase).
#[test]
fn metrics_after_a_restart_show_the_start_up_state() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.yaml");
    std::fs::write(
        &file,
        "tenants:\n  - id: acme\n    miradore: { site: acme, apiKey: { value: restart-key } }\n",
    )
    .unwrap();
    let args = [
        "--tenants-file",
        file.to_str().unwrap(),
        "--tenants-file-interval",
        "50ms",
    ];
    let first = serve_with(dir.path(), KEY, &args, "info").unwrap();
    first.crash();
    let server = serve_with(dir.path(), KEY, &args, "info").unwrap();
    let (status, text) = http_get(&admin_addr(&server), "/metrics");
    assert_eq!(status, 200);
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} is not exported:\n{text}"))
    };
    assert_eq!(value("sidekey_tenants_configured"), 1.0);
    assert_eq!(
        value(r#"sidekey_tenants_file_applies_total{outcome="applied"}"#),
        1.0
    );
    assert_eq!(
        value(r#"sidekey_tenants_file_applies_total{outcome="rejected"}"#),
        0.0
    );
    assert_eq!(
        value(r#"sidekey_token_exchanges_total{outcome="failed"}"#),
        0.0
    );
    assert_eq!(
        value(r#"sidekey_proxy_requests_total{vendor="miradore",status_class="5xx",error="none"}"#),
        0.0
    );
    assert_eq!(value("sidekey_store_healthy"), 1.0);
    assert!(value("process_start_time_seconds") > 0.0);
    assert!(value("process_resident_memory_bytes") > 0.0);
    assert!(
        text.contains(&format!(
            "sidekey_build_info{{version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
}

#[test]
fn otlp_endpoints_outside_the_grammar_stop_start_up() {
    // The flag (and so SIDEKEY_OTLP_ENDPOINT) and the standard variable share one grammar.
    let dir = tempfile::tempdir().unwrap();
    let failed = serve_with(
        dir.path(),
        KEY,
        &["--otlp-endpoint", "grpc://collector:4317"],
        "info",
    )
    .err()
    .expect("must not start");
    assert!(failed.contains("--otlp-endpoint"), "{failed}");
    assert!(failed.contains("scheme must be http or https"), "{failed}");
    let failed = serve_with_env(
        dir.path(),
        KEY,
        &[],
        "info",
        &[("SIDEKEY_OTLP_ENDPOINT", "http://u:secret-pw@collector:4317")],
    )
    .err()
    .expect("must not start");
    assert!(failed.contains("--otlp-endpoint"), "{failed}");
    assert!(!failed.contains("secret-pw"), "{failed}");

    let failed = serve_with_env(
        dir.path(),
        KEY,
        &[],
        "info",
        &[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://u:secret-pw@collector:4317",
        )],
    )
    .err()
    .expect("must not start");
    assert!(failed.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{failed}");
    assert!(!failed.contains("secret-pw"), "{failed}");

    // A valid one starts sidekey, collector or not; the flag wins over the variable.
    let server = serve_with_env(
        dir.path(),
        KEY,
        &["--otlp-endpoint", "http://127.0.0.1:9"],
        "info",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
    )
    .unwrap();
    drop(server);
}
