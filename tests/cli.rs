//! The `sidekey` binary driven as a user would: `serve` in a child process, the client
//! commands against it, a crash (SIGKILL) and restarts.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

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
}

/// Starts `sidekey serve` and waits for its ready line (or its exit).
fn serve(dir: &Path, key: &str) -> Result<Server, String> {
    let socket = dir.join("grpc.sock");
    let mut child = bin()
        .args(["serve", "--proxy-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--grpc-listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("SIDEKEY_MASTER_KEY", key)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sidekey serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
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
        self.log.try_iter().collect::<Vec<_>>().join("\n")
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
            "tenants", "create", "acme", "--display-name", "Acme",
            "--miradore-site", "AcmeSite", "--miradore-api-key-file", "-",
        ],
        Some("1_AaDf234sdf8!4\n"),
    ));
    assert!(out.contains("AcmeSite") && out.contains("sha256:"), "{out}");
    assert!(!out.contains("1_AaDf234sdf8!4"));

    // Secret from an environment variable; JSON output for scripts.
    let mut cmd = bin();
    let out = cmd
        .args(["tenants", "update", "acme", "--m3ter-access-key-id", "AK", "--m3ter-org-id", ORG])
        .args(["--m3ter-api-secret-env", "ACME_SECRET", "-o", "json", "--server"])
        .arg(format!("unix:{}", server.socket.display()))
        .env("ACME_SECRET", "m3ter-secret-value")
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["m3ter"]["accessKeyId"], "AK");
    assert_eq!(json["miradore"]["site"], "AcmeSite");
    assert!(json["m3ter"]["apiSecret"]["fingerprint"].as_str().unwrap().starts_with("sha256:"));
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
    assert!(list.contains("acme") && list.contains("beta") && list.contains("mailkit"), "{list}");

    // Crash without a clean shutdown, restart: every acknowledged write is there.
    server.crash();
    let server = serve(dir.path(), KEY).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&server.cli(&["tenants", "get", "acme", "-o", "json"]))).unwrap();
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
fn validation_failures_are_listed_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), KEY).unwrap();
    let err = stderr(&server.cli(&[
        "tenants", "create", "Bad_Id", "--m3ter-org-id", "nope", "--mailkit-client-id", "x1",
    ]));
    for field in ["tenant.id", "tenant.m3ter.org_id", "tenant.mailkit.client_id"] {
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
    assert!(err.contains("cannot reach sidekey") && err.contains("sidekey serve"), "{err}");
}
