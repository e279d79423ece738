//! Connection flags shared by `tenants create|update` and `partner update`. Secrets come
//! from a file (`-` for standard input) or an environment variable, never from the command
//! line itself, where other users of the machine could read them.

use std::io::Read;
use std::path::PathBuf;

use crate::model::VendorKind;
use crate::proto;
use crate::wire::ProtoConnectionsOwned;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConnectionFlags {
    /// Use Miradore (fields left out inherit the partner defaults).
    #[arg(long)]
    pub miradore: bool,
    /// Miradore site name (case-sensitive).
    #[arg(long)]
    pub miradore_site: Option<String>,
    /// File holding the Miradore API key ("-" reads standard input).
    #[arg(long, value_name = "PATH")]
    pub miradore_api_key_file: Option<PathBuf>,
    /// Environment variable holding the Miradore API key.
    #[arg(long, value_name = "VAR")]
    pub miradore_api_key_env: Option<String>,

    /// Use m3ter (fields left out inherit the partner defaults).
    #[arg(long)]
    pub m3ter: bool,
    /// m3ter access key ID.
    #[arg(long)]
    pub m3ter_access_key_id: Option<String>,
    /// File holding the m3ter API secret ("-" reads standard input).
    #[arg(long, value_name = "PATH")]
    pub m3ter_api_secret_file: Option<PathBuf>,
    /// Environment variable holding the m3ter API secret.
    #[arg(long, value_name = "VAR")]
    pub m3ter_api_secret_env: Option<String>,
    /// m3ter organisation ID (a UUID).
    #[arg(long)]
    pub m3ter_org_id: Option<String>,
    /// m3ter environment: empty or "prod" for production, else api.<env>.m3ter.com.
    #[arg(long)]
    pub m3ter_environment: Option<String>,

    /// Use Mailkit (fields left out inherit the partner defaults).
    #[arg(long)]
    pub mailkit: bool,
    /// Mailkit client ID (digits).
    #[arg(long)]
    pub mailkit_client_id: Option<String>,
    /// File holding the Mailkit client MD5 ("-" reads standard input).
    #[arg(long, value_name = "PATH")]
    pub mailkit_client_md5_file: Option<PathBuf>,
    /// Environment variable holding the Mailkit client MD5.
    #[arg(long, value_name = "VAR")]
    pub mailkit_client_md5_env: Option<String>,
}

/// The connections the flags describe, the update-mask paths they name, and the vendors
/// named by their bare flag (`--miradore`).
pub struct Parsed {
    pub connections: ProtoConnectionsOwned,
    pub paths: Vec<String>,
    pub flagged: Vec<VendorKind>,
}

impl ConnectionFlags {
    pub fn parse(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, String> {
        let stdin_users = [
            &self.miradore_api_key_file,
            &self.m3ter_api_secret_file,
            &self.mailkit_client_md5_file,
        ]
        .iter()
        .filter(|f| f.as_deref().is_some_and(|p| p.as_os_str() == "-"))
        .count();
        if stdin_users > 1 {
            return Err("only one secret can be read from standard input (-) at a time".into());
        }
        let mut paths = Vec::new();
        let mut text = |v: &Option<String>, path: &str| -> Option<String> {
            v.as_ref().map(|v| {
                paths.push(path.to_owned());
                v.clone()
            })
        };
        let site = text(&self.miradore_site, "miradore.site");
        let key_id = text(&self.m3ter_access_key_id, "m3ter.access_key_id");
        let org = text(&self.m3ter_org_id, "m3ter.org_id");
        let environment = text(&self.m3ter_environment, "m3ter.environment");
        let client_id = text(&self.mailkit_client_id, "mailkit.client_id");

        let mut secret = |file: &Option<PathBuf>,
                          var: &Option<String>,
                          flag: &str,
                          path: &str|
         -> Result<Option<proto::Secret>, String> {
            let value = match (file, var) {
                (Some(_), Some(_)) => {
                    return Err(format!("give --{flag}-file or --{flag}-env, not both"));
                }
                (Some(f), None) => read_secret_file(f, flag)?,
                (None, Some(v)) => env(v)
                    .ok_or_else(|| format!("--{flag}-env: environment variable {v} is not set"))?
                    .trim()
                    .to_owned(),
                (None, None) => return Ok(None),
            };
            if value.is_empty() {
                return Err(format!("--{flag}: the secret is empty"));
            }
            paths.push(path.to_owned());
            Ok(Some(proto::Secret {
                value,
                fingerprint: String::new(),
            }))
        };
        let api_key = secret(
            &self.miradore_api_key_file,
            &self.miradore_api_key_env,
            "miradore-api-key",
            "miradore.api_key",
        )?;
        let api_secret = secret(
            &self.m3ter_api_secret_file,
            &self.m3ter_api_secret_env,
            "m3ter-api-secret",
            "m3ter.api_secret",
        )?;
        let client_md5 = secret(
            &self.mailkit_client_md5_file,
            &self.mailkit_client_md5_env,
            "mailkit-client-md5",
            "mailkit.client_md5",
        )?;

        let miradore = (self.miradore || site.is_some() || api_key.is_some()).then(|| {
            proto::MiradoreConnection {
                site: site.unwrap_or_default(),
                api_key,
            }
        });
        let m3ter = (self.m3ter
            || key_id.is_some()
            || api_secret.is_some()
            || org.is_some()
            || environment.is_some())
        .then(|| proto::M3terConnection {
            access_key_id: key_id.unwrap_or_default(),
            api_secret,
            org_id: org.unwrap_or_default(),
            environment: environment.unwrap_or_default(),
        });
        let mailkit = (self.mailkit || client_id.is_some() || client_md5.is_some()).then(|| {
            proto::MailkitConnection {
                client_id: client_id.unwrap_or_default(),
                client_md5,
            }
        });
        let flagged = [
            (self.miradore, VendorKind::Miradore),
            (self.m3ter, VendorKind::M3ter),
            (self.mailkit, VendorKind::Mailkit),
        ]
        .into_iter()
        .filter_map(|(flag, kind)| flag.then_some(kind))
        .collect();
        Ok(Parsed {
            connections: ProtoConnectionsOwned {
                miradore,
                m3ter,
                mailkit,
            },
            paths,
            flagged,
        })
    }
}

fn read_secret_file(path: &PathBuf, flag: &str) -> Result<String, String> {
    let raw = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("--{flag}-file -: cannot read standard input: {e}"))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| format!("--{flag}-file {}: {e}", path.display()))?
    };
    // A trailing newline from `echo` or an editor is not part of the secret.
    Ok(raw.trim().to_owned())
}
