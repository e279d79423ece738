//! The `sidekey` command line: `serve`, and the control-plane client commands
//! `tenants create|get|list|update|delete|test|apply` and `partner get|update`; `health`;
//! and `completions`. Exit status: see [`Exit`].

pub mod ca;
pub mod client;
pub mod flags;
pub mod health;
pub mod render;
pub mod store;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use prost_types::FieldMask;
use tonic::Code;

use crate::config::ServeArgs;
use crate::document::{self, TenantDoc, kept_secrets};
use crate::model::{Connection, Connections, ProtoRef, Slot, VendorKind, VendorVisitor};
use crate::model::{ProtoConnections, ProtoConnectionsOwned};
use crate::proto;
use client::{ClientArgs, ConnectError, Server, explain};
use flags::ConnectionFlags;
use render::Output;

#[derive(Parser, Debug)]
#[command(
    name = "sidekey",
    version,
    about = "Auth-proxy sidecar: injects per-tenant vendor credentials (Miradore, m3ter, Mailkit)",
    after_help = EXIT_STATUS_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy, the control plane and the admin endpoints.
    Serve(Box<ServeArgs>),
    /// Manage tenants on a running sidekey.
    #[command(after_help = EXIT_STATUS_HELP)]
    Tenants {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: TenantsCommand,
    },
    /// Manage the partner defaults that tenants' blank fields inherit.
    #[command(after_help = EXIT_STATUS_HELP)]
    Partner {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: PartnerCommand,
    },
    /// Back up or verify the embedded store's file (safe beside a running sidekey).
    Store {
        #[command(subcommand)]
        command: store::StoreCommand,
    },
    /// Create the local CA for HTTPS interception (docs/interception.md).
    Ca {
        #[command(subcommand)]
        command: ca::CaCommand,
    },
    /// Exit 0 if the sidekey on this host is ready (its admin /readyz answers 200), else
    /// print why not and exit 1: a health check for images with no shell or HTTP client.
    Health(health::HealthArgs),
    /// Print a shell completion script, e.g. `sidekey completions bash > /etc/bash_completion.d/sidekey`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The exit status of every `sidekey` command, as `sidekey --help` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// The command failed: unreachable server, refused request, unreadable file...
    Failure = 1,
    /// The command line is wrong (clap's own status for a bad flag or value, too).
    Usage = 2,
    /// The tenant (or other record) named does not exist.
    NotFound = 3,
    /// A conflict: the tenant already exists, or its etag changed since it was read.
    Conflict = 4,
}

pub const EXIT_STATUS_HELP: &str = "Exit status: 0 success, 1 failure, 2 usage error (a wrong flag or value), \
3 not found (no such tenant), 4 conflict (the tenant already exists, or --etag no longer matches).";

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        Self::from(e as u8)
    }
}

/// A client command that did not succeed: the sentence to print and the exit status.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Usage,
            message: message.into(),
        }
    }

    /// A failed call: not found and conflicts get their own status so scripts can branch.
    fn status(server: &Server, status: &tonic::Status) -> Self {
        let exit = match status.code() {
            Code::NotFound => Exit::NotFound,
            Code::AlreadyExists | Code::Aborted => Exit::Conflict,
            _ => Exit::Failure,
        };
        Self {
            exit,
            message: explain(server, status),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            exit: Exit::Failure,
            message,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TenantsCommand {
    /// Create a tenant.
    Create {
        id: String,
        #[arg(long)]
        display_name: Option<String>,
        #[command(flatten)]
        connections: Box<ConnectionFlags>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one tenant (secrets as fingerprints).
    Get {
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List every tenant.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Change the fields given as flags; everything else is kept.
    Update {
        id: String,
        #[arg(long)]
        display_name: Option<String>,
        #[command(flatten)]
        connections: Box<ConnectionFlags>,
        /// Stop using a vendor. Repeatable.
        #[arg(long, value_name = "VENDOR")]
        remove: Vec<VendorArg>,
        /// Only update if the tenant's etag is still this one.
        #[arg(long)]
        etag: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a tenant.
    Delete {
        id: String,
        /// Only delete if the tenant's etag is still this one.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Make one harmless authenticated call to a vendor with the tenant's credentials.
    Test {
        id: String,
        #[arg(long, value_enum)]
        vendor: VendorArg,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Create or replace a tenant from a YAML or JSON document.
    Apply {
        /// The document (see docs/control-plane.md); "-" reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum PartnerCommand {
    /// Show the partner defaults.
    Get {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Change the partner defaults given as flags; everything else is kept.
    Update {
        #[command(flatten)]
        connections: Box<ConnectionFlags>,
        /// Remove a vendor's defaults. Repeatable.
        #[arg(long, value_name = "VENDOR")]
        remove: Vec<VendorArg>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

/// A vendor named on the command line (`--vendor`, `--remove`): the name of one of the
/// vendors of [`VendorKind::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VendorArg(VendorKind);

impl VendorArg {
    const ALL: [VendorArg; VendorKind::ALL.len()] = {
        let mut all = [VendorArg(VendorKind::ALL[0]); VendorKind::ALL.len()];
        let mut i = 0;
        while i < all.len() {
            all[i] = VendorArg(VendorKind::ALL[i]);
            i += 1;
        }
        all
    };

    fn path(self) -> &'static str {
        self.0.as_str()
    }

    fn proto(self) -> proto::Vendor {
        crate::control::convert::vendor_out(self.0)
    }
}

impl clap::ValueEnum for VendorArg {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.path()))
    }
}

/// Takes `kind`'s connection out of `c` (`--remove`).
fn remove_vendor(c: &mut ProtoConnectionsOwned, kind: VendorKind) {
    struct Remove<'a>(&'a mut ProtoConnectionsOwned, VendorKind);
    impl VendorVisitor for Remove<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            if C::VENDOR == self.1 {
                *slot.proto_mut(self.0) = None;
            }
        }
    }
    Connections::for_each_vendor(&mut Remove(c, kind));
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Prints `v` as `-o json` or `-o yaml` asks (the same document either way); `table` is
/// printed by each command's own renderer.
fn print_document(v: &serde_json::Value, output: Output) {
    // Serialising a Value cannot fail.
    match output {
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(v).unwrap_or_default()),
        Output::Json | Output::Table => {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
        }
    }
}

fn print_tenant(t: &proto::Tenant, output: Output) {
    match output {
        Output::Table => print!("{}", render::tenant_table(t)),
        Output::Json | Output::Yaml => print_document(&render::tenant_json(t), output),
    }
}

fn print_partner(p: &proto::PartnerDefaults, output: Output) {
    match output {
        Output::Table => print!("{}", render::partner_table(p)),
        Output::Json | Output::Yaml => print_document(&render::partner_json(p), output),
    }
}

/// Runs a client command; `Err` holds the message to print and the exit status.
pub async fn run_client(client: ClientArgs, command: ClientCommand) -> Result<(), Failure> {
    let server = client.server.clone();
    let mut api = client
        .connect(env_var("SIDEKEY_GRPC_TOKEN"))
        .await
        .map_err(|e| match e {
            ConnectError::Usage(m) => Failure::usage(m),
            ConnectError::Failed(m) => Failure::from(m),
        })?;
    let call = |s: tonic::Status| Failure::status(&server, &s);
    match command {
        ClientCommand::Tenants(cmd) => match cmd {
            TenantsCommand::Create {
                id,
                display_name,
                connections,
                output,
            } => {
                let c = connections.parse(&env_var)?;
                let mut tenant = proto::Tenant {
                    id,
                    display_name: display_name.unwrap_or_default(),
                    ..Default::default()
                };
                c.connections.set_in_tenant(&mut tenant);
                let t = api
                    .create_tenant(proto::CreateTenantRequest {
                        tenant: Some(tenant),
                    })
                    .await
                    .map_err(call)?
                    .into_inner();
                print_tenant(&t, output);
            }
            TenantsCommand::Get { id, output } => {
                let t = api
                    .get_tenant(proto::GetTenantRequest { id })
                    .await
                    .map_err(call)?
                    .into_inner();
                print_tenant(&t, output);
            }
            TenantsCommand::List { output } => {
                let mut all = Vec::new();
                let mut page_token = String::new();
                loop {
                    let page = api
                        .list_tenants(proto::ListTenantsRequest {
                            page_size: 1000,
                            page_token,
                        })
                        .await
                        .map_err(call)?
                        .into_inner();
                    all.extend(page.tenants);
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
                match output {
                    Output::Table => print!("{}", render::list_table(&all)),
                    Output::Json | Output::Yaml => print_document(
                        &serde_json::json!({
                            "tenants": all.iter().map(render::tenant_json).collect::<Vec<_>>()
                        }),
                        output,
                    ),
                }
            }
            TenantsCommand::Update {
                id,
                display_name,
                connections,
                remove,
                etag,
                output,
            } => {
                let mut c = connections.parse(&env_var)?;
                let mut paths = c.paths;
                // A bare --miradore (etc.) with no field flags adds the connection with
                // every field inherited.
                for kind in c.flagged {
                    if !paths.iter().any(|p| p.starts_with(kind.as_str())) {
                        paths.push(kind.as_str().to_owned());
                    }
                }
                if display_name.is_some() {
                    paths.push("display_name".into());
                }
                for v in &remove {
                    paths.push(v.path().to_owned());
                }
                if paths.is_empty() {
                    return Err(Failure::usage(
                        "nothing to update: give at least one field flag",
                    ));
                }
                for v in &remove {
                    remove_vendor(&mut c.connections, v.0);
                }
                let mut tenant = proto::Tenant {
                    id,
                    display_name: display_name.unwrap_or_default(),
                    etag: etag.unwrap_or_default(),
                    ..Default::default()
                };
                c.connections.set_in_tenant(&mut tenant);
                let t = api
                    .update_tenant(proto::UpdateTenantRequest {
                        tenant: Some(tenant),
                        update_mask: Some(FieldMask { paths }),
                    })
                    .await
                    .map_err(call)?
                    .into_inner();
                print_tenant(&t, output);
            }
            TenantsCommand::Delete { id, etag } => {
                api.delete_tenant(proto::DeleteTenantRequest {
                    id: id.clone(),
                    etag: etag.unwrap_or_default(),
                })
                .await
                .map_err(call)?;
                println!("deleted tenant {id}");
            }
            TenantsCommand::Test { id, vendor, output } => {
                let r = api
                    .test_tenant(proto::TestTenantRequest {
                        id: id.clone(),
                        vendor: vendor.proto() as i32,
                    })
                    .await
                    .map_err(call)?
                    .into_inner();
                match output {
                    Output::Table => println!(
                        "{}: {} (HTTP {})",
                        if r.ok { "ok" } else { "refused" },
                        r.message,
                        r.http_status
                    ),
                    Output::Json | Output::Yaml => print_document(
                        &serde_json::json!({
                            "tenant": id,
                            "vendor": vendor.path(),
                            "ok": r.ok,
                            "httpStatus": r.http_status,
                            "message": r.message,
                        }),
                        output,
                    ),
                }
                if !r.ok {
                    return Err(Failure::from(if r.http_status == 0 {
                        format!("the test call to {} got no answer", vendor.path())
                    } else {
                        format!("{} did not accept the credentials", vendor.path())
                    }));
                }
            }
            TenantsCommand::Apply { file, output } => {
                let tenant = read_document(file).await?;
                let t = apply(&mut api, &server, tenant).await?;
                print_tenant(&t, output);
            }
        },
        ClientCommand::Partner(cmd) => match cmd {
            PartnerCommand::Get { output } => {
                let p = api
                    .get_partner_defaults(proto::GetPartnerDefaultsRequest {})
                    .await
                    .map_err(call)?
                    .into_inner();
                print_partner(&p, output);
            }
            PartnerCommand::Update {
                connections,
                remove,
                output,
            } => {
                let mut c = connections.parse(&env_var)?;
                let mut paths = c.paths;
                for v in &remove {
                    paths.push(v.path().to_owned());
                }
                for kind in c.flagged {
                    if !paths.iter().any(|p| p.starts_with(kind.as_str())) {
                        paths.push(kind.as_str().to_owned());
                    }
                }
                if paths.is_empty() {
                    return Err(Failure::usage(
                        "nothing to update: give at least one field flag",
                    ));
                }
                for v in &remove {
                    remove_vendor(&mut c.connections, v.0);
                }
                let mut partner_defaults = proto::PartnerDefaults::default();
                c.connections.set_in_partner(&mut partner_defaults);
                let p = api
                    .update_partner_defaults(proto::UpdatePartnerDefaultsRequest {
                        partner_defaults: Some(partner_defaults),
                        update_mask: Some(FieldMask { paths }),
                    })
                    .await
                    .map_err(call)?
                    .into_inner();
                print_partner(&p, output);
            }
        },
    }
    Ok(())
}

/// Reads, parses and resolves the document of `tenants apply -f FILE` (`-`: standard input)
/// on the blocking pool, within [`document::READ_DEADLINE`]: a secret file on a dead mount
/// cannot hang the command.
async fn read_document(file: PathBuf) -> Result<proto::Tenant, String> {
    let read = tokio::task::spawn_blocking(move || {
        let doc = if file.as_os_str() == "-" {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(std::io::stdin(), document::MAX_DOCUMENT_BYTES + 1),
                &mut bytes,
            )
            .map_err(|e| format!("cannot read standard input: {e}"))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| "standard input is not UTF-8 text".to_owned())?;
            TenantDoc::parse(&text)
                .map_err(|e| format!("standard input is not a valid tenant document: {e}"))?
        } else {
            TenantDoc::from_file(&file).map_err(|e| e.to_string())?
        };
        doc.into_proto(&env_var).map_err(|e| e.to_string())
    });
    match tokio::time::timeout(document::READ_DEADLINE, read).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(format!("reading the document failed: {e}")),
        Err(_) => Err(format!(
            "reading the document and its secret files took longer than {:?}",
            document::READ_DEADLINE
        )),
    }
}

/// Creates the tenant, or replaces it when it exists: the document is the whole desired
/// state, so connections it leaves out are removed and blank fields inherit. A secret given
/// by fingerprint only (as `get -o json` prints it) keeps the stored value, provided the
/// fingerprint still matches it; the update is conditional on the etag read, so a concurrent
/// change makes it fail rather than be overwritten.
async fn apply(
    api: &mut client::Client,
    server: &Server,
    tenant: proto::Tenant,
) -> Result<proto::Tenant, Failure> {
    let kept = kept_secrets((&tenant).into());
    let current = match api
        .get_tenant(proto::GetTenantRequest {
            id: tenant.id.clone(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::NotFound => {
            if let Some((path, _)) = kept.first() {
                return Err(Failure::from(format!(
                    "{path}: only a fingerprint is given, and tenant {:?} does not exist to keep a secret from; give value or valueFrom",
                    tenant.id
                )));
            }
            return api
                .create_tenant(proto::CreateTenantRequest {
                    tenant: Some(tenant),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| Failure::status(server, &s));
        }
        Err(s) => return Err(Failure::status(server, &s)),
    };
    let stored_secrets = secret_fingerprints((&current).into());
    let stored = |path: &str| -> Option<&str> {
        stored_secrets
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, fp)| *fp)
    };
    for (path, fingerprint) in &kept {
        if stored(path) != Some(*fingerprint) {
            return Err(Failure::from(format!(
                "{path}: the fingerprint {fingerprint} is not that of the stored secret ({}); give value or valueFrom to change it",
                stored(path).unwrap_or("none stored")
            )));
        }
    }

    let paths = apply_paths((&tenant).into(), &kept);
    api.update_tenant(proto::UpdateTenantRequest {
        tenant: Some(proto::Tenant {
            etag: current.etag,
            ..tenant
        }),
        update_mask: Some(FieldMask { paths }),
    })
    .await
    .map(tonic::Response::into_inner)
    .map_err(|s| Failure::status(server, &s))
}

/// The fingerprint of each secret of `c`, by update-mask path (`m3ter.api_secret`).
fn secret_fingerprints(c: ProtoConnections<'_>) -> Vec<(String, &str)> {
    struct Fingerprints<'a> {
        msgs: ProtoConnections<'a>,
        out: Vec<(String, &'a str)>,
    }
    impl<'a> VendorVisitor for Fingerprints<'a> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            let Some(msg) = slot.proto(self.msgs) else {
                return;
            };
            for field in C::FIELDS {
                if let ProtoRef::Secret(Some(s)) = (field.proto)(msg) {
                    let path = format!("{}.{}", C::VENDOR.as_str(), field.name);
                    self.out.push((path, s.fingerprint.as_str()));
                }
            }
        }
    }
    let mut fps = Fingerprints {
        msgs: c,
        out: Vec::new(),
    };
    Connections::for_each_vendor(&mut fps);
    fps.out
}

/// The update mask of `tenants apply`: the display name; each vendor the document leaves
/// out (removed); every field of each vendor it has, except the secrets `kept` by
/// fingerprint.
fn apply_paths(c: ProtoConnections<'_>, kept: &[(String, &str)]) -> Vec<String> {
    struct Paths<'a> {
        msgs: ProtoConnections<'a>,
        kept: &'a [(String, &'a str)],
        out: Vec<String>,
    }
    impl VendorVisitor for Paths<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            let vendor = C::VENDOR.as_str();
            let Some(msg) = slot.proto(self.msgs) else {
                self.out.push(vendor.to_owned());
                return;
            };
            let (texts, secrets): (Vec<_>, Vec<_>) = C::FIELDS
                .iter()
                .partition(|f| matches!((f.proto)(msg), ProtoRef::Text(_)));
            for field in texts.into_iter().chain(secrets) {
                let path = format!("{vendor}.{}", field.name);
                if !self.kept.iter().any(|(p, _)| *p == path) {
                    self.out.push(path);
                }
            }
        }
    }
    let mut paths = Paths {
        msgs: c,
        kept,
        out: vec!["display_name".to_owned()],
    };
    Connections::for_each_vendor(&mut paths);
    paths.out
}

/// The client commands, split from `Command` so `serve` needs no client arguments.
pub enum ClientCommand {
    Tenants(TenantsCommand),
    Partner(PartnerCommand),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update_args(args: &[&str]) -> (ConnectionFlags, Vec<VendorArg>) {
        let argv = ["sidekey", "tenants", "update", "acme"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Tenants {
                command:
                    TenantsCommand::Update {
                        connections,
                        remove,
                        ..
                    },
                ..
            } => (*connections, remove),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn vendor_arguments_take_every_vendor_name_and_nothing_else() {
        let (flags, remove) = update_args(&["--remove", "m3ter", "--remove", "mailkit"]);
        assert_eq!(
            remove,
            [VendorArg(VendorKind::M3ter), VendorArg(VendorKind::Mailkit)]
        );
        assert!(flags.parse(&|_| None).unwrap().flagged.is_empty());
        for kind in VendorKind::ALL {
            let (_, remove) = update_args(&["--remove", kind.as_str()]);
            assert_eq!(remove, [VendorArg(kind)]);
            assert_eq!(remove[0].proto(), crate::control::convert::vendor_out(kind));
        }
        let argv = ["sidekey", "tenants", "update", "acme", "--remove", "nope"];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn bare_vendor_flags_and_remove_shape_the_request() {
        let (flags, _) = update_args(&["--miradore", "--m3ter-org-id", "o"]);
        let mut c = flags.parse(&|_| None).unwrap();
        assert_eq!(c.flagged, [VendorKind::Miradore]);
        assert_eq!(c.paths, ["m3ter.org_id"]);
        assert!(
            c.connections.as_tenant().miradore.is_some()
                && c.connections.as_tenant().m3ter.is_some()
        );
        remove_vendor(&mut c.connections, VendorKind::M3ter);
        assert!(
            c.connections.as_tenant().miradore.is_some()
                && c.connections.as_tenant().m3ter.is_none()
        );
    }

    #[test]
    fn apply_masks_every_field_but_kept_secrets_and_removes_absent_vendors() {
        let kept_secret = Some(proto::Secret {
            value: String::new(),
            fingerprint: "sha256:0123".into(),
        });
        let tenant = proto::Tenant {
            m3ter: Some(proto::M3terConnection {
                api_secret: kept_secret,
                ..Default::default()
            }),
            ..Default::default()
        };
        let kept = kept_secrets((&tenant).into());
        assert_eq!(
            secret_fingerprints((&tenant).into()),
            [("m3ter.api_secret".to_owned(), "sha256:0123")]
        );
        assert_eq!(
            apply_paths((&tenant).into(), &kept),
            [
                "display_name",
                "miradore",
                "m3ter.access_key_id",
                "m3ter.org_id",
                "m3ter.environment",
                "mailkit",
            ]
        );
    }
}
