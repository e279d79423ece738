//! Connection flags shared by `tenants create|update` and `partner update`. Secrets come
//! from a file (`-` for standard input) or an environment variable, never from the command
//! line itself, where other users of the machine could read them.
//!
//! The flags follow the credential schema ([`crate::model::Connection::FIELDS`]): per vendor,
//! a bare `--<vendor>`, then per field in its declared order `--<vendor>-<field>` for text,
//! or `--<vendor>-<field>-file` and `--<vendor>-<field>-env` for a secret, with the help
//! line the schema gives. Nothing here names a vendor.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches, Command, value_parser};

use crate::model::ProtoConnectionsOwned;
use crate::model::{Connection, Connections, ProtoMut, Slot, VendorKind, VendorVisitor};
use crate::proto;

/// The vendor flags given on a command line, by flag id (`miradore_api_key_file`).
#[derive(Clone, Debug, Default)]
pub struct ConnectionFlags {
    given: HashMap<String, Given>,
}

#[derive(Clone, Debug)]
enum Given {
    /// A bare vendor flag (`--miradore`).
    Set,
    /// A text field, or the variable named by a secret's `-env` flag.
    Text(String),
    /// The file named by a secret's `-file` flag.
    File(PathBuf),
}

/// What a flag holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bare,
    Text,
    SecretFile,
    SecretEnv,
}

/// One flag, as the schema declares it.
struct Flag {
    /// Its clap id, which is also its name with '_' for '-'.
    id: String,
    kind: FlagKind,
    help: String,
}

/// The id of a flag: `miradore`, `miradore_site`, `miradore_api_key_file`.
fn flag_id(vendor: VendorKind, field: Option<&str>, kind: FlagKind) -> String {
    let suffix = match kind {
        FlagKind::SecretFile => "_file",
        FlagKind::SecretEnv => "_env",
        FlagKind::Bare | FlagKind::Text => "",
    };
    match field {
        Some(field) => format!("{}_{field}{suffix}", vendor.as_str()),
        None => vendor.as_str().to_owned(),
    }
}

/// Every vendor flag, in the order `--help` lists them.
fn schema_flags() -> Vec<Flag> {
    struct Flags(Vec<Flag>);
    impl VendorVisitor for Flags {
        fn visit<C: Connection>(&mut self, _: &Slot<C>) {
            let vendor = C::VENDOR;
            self.0.push(Flag {
                id: flag_id(vendor, None, FlagKind::Bare),
                kind: FlagKind::Bare,
                help: format!(
                    "Use {} (fields left out inherit the partner defaults)",
                    C::TITLE
                ),
            });
            for field in C::FIELDS {
                if field.is_secret() {
                    let (file, env) = (FlagKind::SecretFile, FlagKind::SecretEnv);
                    self.0.push(Flag {
                        id: flag_id(vendor, Some(field.name), file),
                        kind: file,
                        help: format!(
                            "File holding the {} (\"-\" reads standard input)",
                            field.help
                        ),
                    });
                    self.0.push(Flag {
                        id: flag_id(vendor, Some(field.name), env),
                        kind: env,
                        help: format!("Environment variable holding the {}", field.help),
                    });
                } else {
                    self.0.push(Flag {
                        id: flag_id(vendor, Some(field.name), FlagKind::Text),
                        kind: FlagKind::Text,
                        help: field.help.to_owned(),
                    });
                }
            }
        }
    }
    let mut flags = Flags(Vec::new());
    Connections::for_each_vendor(&mut flags);
    flags.0
}

impl Flag {
    /// The argument, as clap's derive builds it for a `bool`, `Option<String>` or
    /// `Option<PathBuf>` field with `#[arg(long)]`.
    fn arg(&self) -> Arg {
        let arg = Arg::new(self.id.clone())
            .long(self.id.replace('_', "-"))
            .help(self.help.clone());
        match self.kind {
            FlagKind::Bare => arg.action(ArgAction::SetTrue),
            FlagKind::Text => arg
                .value_name(self.id.to_uppercase())
                .action(ArgAction::Set)
                .value_parser(value_parser!(String)),
            FlagKind::SecretFile => arg
                .value_name("PATH")
                .action(ArgAction::Set)
                .value_parser(value_parser!(PathBuf)),
            FlagKind::SecretEnv => arg
                .value_name("VAR")
                .action(ArgAction::Set)
                .value_parser(value_parser!(String)),
        }
    }

    fn given(&self, m: &ArgMatches) -> Result<Option<Given>, clap::Error> {
        let wrong = |e: clap::parser::MatchesError| {
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, e.to_string())
        };
        Ok(match self.kind {
            FlagKind::Bare => m
                .try_get_one::<bool>(&self.id)
                .map_err(wrong)?
                .is_some_and(|set| *set)
                .then_some(Given::Set),
            FlagKind::Text | FlagKind::SecretEnv => m
                .try_get_one::<String>(&self.id)
                .map_err(wrong)?
                .map(|v| Given::Text(v.clone())),
            FlagKind::SecretFile => m
                .try_get_one::<PathBuf>(&self.id)
                .map_err(wrong)?
                .map(|p| Given::File(p.clone())),
        })
    }
}

impl clap::Args for ConnectionFlags {
    fn augment_args(cmd: Command) -> Command {
        cmd.args(schema_flags().iter().map(Flag::arg))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for ConnectionFlags {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Self::default();
        flags.update_from_arg_matches(m)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        for flag in schema_flags() {
            if let Some(given) = flag.given(m)? {
                self.given.insert(flag.id, given);
            }
        }
        Ok(())
    }
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
        let stdin_users = self
            .given
            .values()
            .filter(|g| matches!(g, Given::File(p) if p.as_os_str() == "-"))
            .count();
        if stdin_users > 1 {
            return Err("only one secret can be read from standard input (-) at a time".into());
        }
        // Text fields first, then secrets, each in the schema's order: the mask lists them so.
        let mut fill = Fill {
            flags: self,
            env,
            secrets: false,
            parsed: Parsed {
                connections: ProtoConnectionsOwned::default(),
                paths: Vec::new(),
                flagged: Vec::new(),
            },
            error: None,
        };
        Connections::for_each_vendor(&mut fill);
        fill.secrets = true;
        Connections::for_each_vendor(&mut fill);
        match fill.error {
            Some(e) => Err(e),
            None => Ok(fill.parsed),
        }
    }

    fn get(&self, vendor: VendorKind, field: Option<&str>, kind: FlagKind) -> Option<&Given> {
        self.given.get(&flag_id(vendor, field, kind))
    }
}

/// Fills each vendor's message from the flags: text fields on the first walk (which also
/// creates the message of each vendor the flags name), secrets on the second.
struct Fill<'a> {
    flags: &'a ConnectionFlags,
    env: &'a dyn Fn(&str) -> Option<String>,
    secrets: bool,
    parsed: Parsed,
    error: Option<String>,
}

impl VendorVisitor for Fill<'_> {
    fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
        if self.error.is_some() {
            return;
        }
        let vendor = C::VENDOR;
        let flags = self.flags;
        if !self.secrets {
            let bare = flags.get(vendor, None, FlagKind::Bare).is_some();
            let any_field = C::FIELDS.iter().any(|f| {
                [FlagKind::Text, FlagKind::SecretFile, FlagKind::SecretEnv]
                    .into_iter()
                    .any(|kind| flags.get(vendor, Some(f.name), kind).is_some())
            });
            if bare {
                self.parsed.flagged.push(vendor);
            }
            if bare || any_field {
                slot.proto_mut(&mut self.parsed.connections)
                    .get_or_insert_default();
            }
        }
        let Some(msg) = slot.proto_mut(&mut self.parsed.connections).as_mut() else {
            return;
        };
        let path = |field: &str| format!("{}.{field}", vendor.as_str());
        for field in C::FIELDS {
            match (field.proto_mut)(msg) {
                ProtoMut::Text(dst) if !self.secrets => {
                    if let Some(Given::Text(v)) =
                        flags.get(vendor, Some(field.name), FlagKind::Text)
                    {
                        v.clone_into(dst);
                        self.parsed.paths.push(path(field.name));
                    }
                }
                ProtoMut::Secret(dst) if self.secrets => {
                    let flag = format!("{}-{}", vendor.as_str(), field.name.replace('_', "-"));
                    let file = flags.get(vendor, Some(field.name), FlagKind::SecretFile);
                    let var = flags.get(vendor, Some(field.name), FlagKind::SecretEnv);
                    match read_secret(file, var, &flag, self.env) {
                        Ok(None) => {}
                        Ok(Some(value)) => {
                            *dst = Some(proto::Secret {
                                value,
                                fingerprint: String::new(),
                            });
                            self.parsed.paths.push(path(field.name));
                        }
                        Err(e) => {
                            self.error = Some(e);
                            return;
                        }
                    }
                }
                ProtoMut::Text(_) | ProtoMut::Secret(_) => {}
            }
        }
    }
}

/// The secret named by `--<flag>-file` or `--<flag>-env`, if either is given.
fn read_secret(
    file: Option<&Given>,
    var: Option<&Given>,
    flag: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    let value = match (file, var) {
        (Some(_), Some(_)) => {
            return Err(format!("give --{flag}-file or --{flag}-env, not both"));
        }
        (Some(Given::File(f)), None) => read_secret_file(f, flag)?,
        (None, Some(Given::Text(v))) => env(v)
            .ok_or_else(|| format!("--{flag}-env: environment variable {v} is not set"))?
            .trim()
            .to_owned(),
        _ => return Ok(None),
    };
    if value.is_empty() {
        return Err(format!("--{flag}: the secret is empty"));
    }
    Ok(Some(value))
}

fn read_secret_file(path: &Path, flag: &str) -> Result<String, String> {
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

#[cfg(test)]
mod tests {
    use clap::{Args, FromArgMatches};

    use super::*;

    fn flags(args: &[&str]) -> ConnectionFlags {
        let cmd = ConnectionFlags::augment_args(Command::new("t"));
        let m = cmd.try_get_matches_from(std::iter::once("t").chain(args.iter().copied()));
        ConnectionFlags::from_arg_matches(&m.unwrap()).unwrap()
    }

    #[test]
    fn flags_follow_the_schema_in_order() {
        let cmd = ConnectionFlags::augment_args(Command::new("t"));
        let longs: Vec<_> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
        assert_eq!(
            longs,
            [
                "miradore",
                "miradore-site",
                "miradore-api-key-file",
                "miradore-api-key-env",
                "m3ter",
                "m3ter-access-key-id",
                "m3ter-api-secret-file",
                "m3ter-api-secret-env",
                "m3ter-org-id",
                "m3ter-environment",
                "mailkit",
                "mailkit-client-id",
                "mailkit-client-md5-file",
                "mailkit-client-md5-env",
            ]
        );
    }

    #[test]
    fn texts_then_secrets_fill_the_messages_and_the_mask() {
        let env = |v: &str| (v == "S").then(|| " s3cret\n".to_owned());
        let c = flags(&["--mailkit-client-md5-env", "S", "--mailkit-client-id", "7"])
            .parse(&env)
            .unwrap();
        assert_eq!(c.paths, ["mailkit.client_id", "mailkit.client_md5"]);
        let m = c.connections.as_tenant().mailkit.clone().unwrap();
        assert_eq!(
            (m.client_id.as_str(), m.client_md5.unwrap().value.as_str()),
            ("7", "s3cret")
        );
        assert!(c.connections.as_tenant().miradore.is_none() && c.flagged.is_empty());
    }

    #[test]
    fn conflicting_or_missing_secret_sources_are_refused() {
        let none = |_: &str| None;
        let cases = [
            (
                vec![
                    "--m3ter-api-secret-file",
                    "/x",
                    "--m3ter-api-secret-env",
                    "V",
                ],
                "give --m3ter-api-secret-file or --m3ter-api-secret-env, not both",
            ),
            (
                vec![
                    "--miradore-api-key-file",
                    "-",
                    "--mailkit-client-md5-file",
                    "-",
                ],
                "only one secret can be read from standard input (-) at a time",
            ),
            (
                vec!["--mailkit-client-md5-env", "NOPE"],
                "--mailkit-client-md5-env: environment variable NOPE is not set",
            ),
        ];
        for (args, expected) in cases {
            assert_eq!(flags(&args).parse(&none).err().as_deref(), Some(expected));
        }
    }
}
