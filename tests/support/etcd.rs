//! A real etcd (Debian's `etcd-server`, 3.4) for fleet tests: started in a temporary
//! directory on ephemeral ports, its client address read from its own log line, stopped by
//! pid (kill on drop). It can be stopped and started again on the same data and the same
//! client port, for outage tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long etcd may take to start serving clients.
const START_DEADLINE: Duration = Duration::from_secs(30);
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// TLS material for an etcd serving https (client certificates required): a fresh CA, a
/// server certificate for 127.0.0.1 and a client certificate, as PEM files.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    _dir: tempfile::TempDir,
}

impl EtcdTls {
    pub fn generate() -> EtcdTls {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("tls dir");
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write pem");
            path
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "etcd test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let ca = write("ca.pem", ca_cert.pem());
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, cn: &str| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(names).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &issuer).expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], "etcd");
        let (client_cert, client_key) = leaf(Vec::new(), "sidekey");
        EtcdTls {
            ca,
            server_cert: write("server.pem", server_cert),
            server_key: write("server-key.pem", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client-key.pem", client_key),
            _dir: dir,
        }
    }
}

pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT` once started.
    pub addr: String,
    tls: Option<EtcdTls>,
}

impl Etcd {
    /// Starts a fresh single-member etcd.
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// Starts one serving https only, with client certificates signed by `tls.ca` required.
    pub fn start_tls(tls: EtcdTls) -> Etcd {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> Etcd {
        let dir = tempfile::tempdir().expect("etcd dir");
        let mut etcd = Etcd {
            child: None,
            dir,
            addr: String::new(),
            tls,
        };
        etcd.spawn("127.0.0.1:0");
        etcd
    }

    /// `http://ADDR` (or `https://` for a TLS etcd).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills etcd (SIGKILL, by pid) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on its data and its client port.
    pub fn restart(&mut self) {
        self.stop();
        let addr = self.addr.clone();
        self.spawn(&addr);
    }

    /// A client as root (with the test's client certificate on a TLS etcd).
    pub async fn client(&self) -> etcd_client::Client {
        self.client_with(None).await
    }

    pub async fn client_with(&self, user: Option<(&str, &str)>) -> etcd_client::Client {
        let mut options = etcd_client::ConnectOptions::new();
        if let Some(tls) = &self.tls {
            let read = |p: &Path| std::fs::read(p).expect("read pem");
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
                    .identity(etcd_client::Identity::from_pem(
                        read(&tls.client_cert),
                        read(&tls.client_key),
                    )),
            );
        }
        if let Some((user, password)) = user {
            options = options.with_user(user, password);
        }
        etcd_client::Client::connect([self.endpoint()], Some(options))
            .await
            .expect("etcd client")
    }

    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    fn spawn(&mut self, client_addr: &str) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://{client_addr}");
        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg("http://127.0.0.1:0")
            .arg("--initial-advertise-peer-urls")
            .arg("http://127.0.0.1:0")
            .arg("--initial-cluster")
            .arg("default=http://127.0.0.1:0")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let mut child = cmd
            .spawn()
            .expect("etcd starts (is etcd-server installed?)");
        let stderr = child.stderr.take().expect("etcd stderr");
        let (tx, rx) = mpsc::channel();
        // Reads every line (so etcd never blocks on a full pipe), reporting the client address.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("\"msg\":\"serving client traffic")
                    && let Some(addr) = json_field(&line, "address")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        self.child = Some(child);
        match rx.recv_timeout(START_DEADLINE) {
            Ok(addr) => self.addr = addr,
            Err(_) => {
                self.stop();
                panic!("etcd did not serve clients within {START_DEADLINE:?}");
            }
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The string value of `"name":"..."` in a JSON log line.
fn json_field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_owned())
}

/// A TCP relay in front of etcd that a test can cut (every connection closed, new ones
/// refused) and restore: one sidekey loses etcd while the others keep it.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay listens");
        let addr = listener.local_addr().expect("relay addr");
        let (cut, watching) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *watching.borrow() {
                    continue; // dropped: refused
                }
                let target = target.clone();
                let mut cut = watching.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Relay { addr, cut, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
