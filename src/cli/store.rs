//! `sidekey store backup|verify`: offline-safe tools on the embedded store's file. Both open
//! it read-only, so they run beside a live `sidekey serve` (which opens it in redb's
//! single-writer mode, letting readers share the file) and never change it.
//!
//! `sidekey store copy`: every record of one store into another (an embedded store into
//! etcd for fleet mode, or etcd onto itself to re-seal under a new master key), see
//! [`crate::store::copy`].

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use clap::Subcommand;

use crate::config::EtcdArgs;
use crate::store::Store;
use crate::store::copy::{CopyReport, copy};
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::EtcdStore;

use crate::store::embedded::{self, DATA_FILE, VerifyReport};
use crate::store::master_key::{GENERATED_KEY_FILE, MASTER_KEY_ENV, MasterKeySource, MasterKeys};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy the store to a new file: a consistent snapshot of the last commit, records still
    /// sealed (no key needed), taken without stopping sidekey.
    Backup {
        /// The data directory of the store to copy.
        #[arg(long, env = "SIDEKEY_DATA_DIR", default_value = "./sidekey-data")]
        data_dir: PathBuf,
        /// The backup file to create (it must not exist yet); written with mode 0600.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check, read-only, that the store opens under the master key and every record
    /// authenticates; print counts. Exits non-zero on any failure.
    Verify {
        /// The data directory of the store to check.
        #[arg(long, env = "SIDEKEY_DATA_DIR", default_value = "./sidekey-data")]
        data_dir: PathBuf,
        /// Check this store file (a backup, say) instead of the one in --data-dir.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The master key file, as for serve. Without it and without SIDEKEY_MASTER_KEY,
        /// the key generated in --data-dir (master.key) is used; none is ever generated.
        #[arg(long, env = "SIDEKEY_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
    },
    /// Copy every tenant and the partner defaults of one store into another, opening and
    /// sealing records again in memory only (the active master key seals the copy). Refuses
    /// before writing anything when the destination already has any of those tenants,
    /// unless --overwrite.
    Copy {
        /// The source: embedded:DIR (a data directory, its sidekey stopped) or etcd (the
        /// --etcd-* settings).
        #[arg(long)]
        from: StoreSpec,
        /// The destination, in the same form.
        #[arg(long)]
        to: StoreSpec,
        /// Replace the destination's records that the source has too.
        #[arg(long)]
        overwrite: bool,
        /// The master key file, as for serve (new key first to re-seal under it). Without it
        /// and without SIDEKEY_MASTER_KEY, an embedded side's generated key (master.key in
        /// its directory) is used.
        #[arg(long, env = "SIDEKEY_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// One side of `store copy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    Embedded(PathBuf),
    Etcd,
}

impl FromStr for StoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            _ if s == "etcd" => Ok(StoreSpec::Etcd),
            Some(("embedded", dir)) if !dir.is_empty() => Ok(StoreSpec::Embedded(dir.into())),
            _ => Err(format!("{s:?}: expected embedded:DIR or etcd")),
        }
    }
}

/// What `run` needs from the environment besides the flags.
#[derive(Clone, Debug, Default)]
pub struct StoreEnv {
    /// SIDEKEY_MASTER_KEY.
    pub master_key: Option<String>,
    /// SIDEKEY_ETCD_PASSWORD.
    pub etcd_password: Option<String>,
}

/// Runs a store command; the line to print, or the error.
pub fn run(command: StoreCommand, env: StoreEnv) -> Result<String, String> {
    let master_key_env = env.master_key.clone();
    match command {
        StoreCommand::Backup { data_dir, out } => {
            let source = data_dir.join(DATA_FILE);
            let report = embedded::backup_file(&source, &out).map_err(|e| e.to_string())?;
            Ok(format!(
                "backed up {} to {}: {}",
                source.display(),
                out.display(),
                describe(&report)
            ))
        }
        StoreCommand::Verify {
            data_dir,
            file,
            master_key_file,
        } => {
            let keys = load_keys(&data_dir, master_key_file, master_key_env)?;
            let path = file.unwrap_or_else(|| data_dir.join(DATA_FILE));
            let report = embedded::verify_file(&path, &keys).map_err(|e| e.to_string())?;
            Ok(format!(
                "{} verified: every record authenticates; {}",
                path.display(),
                describe(&report)
            ))
        }
        StoreCommand::Copy {
            from,
            to,
            overwrite,
            master_key_file,
            etcd,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            let report =
                runtime.block_on(copy_stores(from, to, overwrite, master_key_file, etcd, env))?;
            Ok(format!(
                "copied {} tenant{} ({} created, {} replaced){}",
                report.created + report.replaced,
                if report.created + report.replaced == 1 {
                    ""
                } else {
                    "s"
                },
                report.created,
                report.replaced,
                if report.partner {
                    " and the partner defaults"
                } else {
                    ""
                }
            ))
        }
    }
}

async fn copy_stores(
    from: StoreSpec,
    to: StoreSpec,
    overwrite: bool,
    master_key_file: Option<PathBuf>,
    etcd: EtcdArgs,
    env: StoreEnv,
) -> Result<CopyReport, String> {
    if from == to && (from != StoreSpec::Etcd || !overwrite) {
        return Err(
            "--from and --to are the same store: only etcd onto itself with --overwrite (to \
             re-seal every record under the active master key) makes sense"
                .into(),
        );
    }
    let (etcd, password_file) = etcd.into_config(env.etcd_password);
    let etcd = etcd.with_password_file(password_file.as_deref())?;
    let batch = etcd.max_txn_ops;
    // The key: given, or an embedded side's generated one; never generated here.
    let key_dir = [&from, &to].into_iter().find_map(|s| match s {
        StoreSpec::Embedded(dir) => Some(dir.clone()),
        StoreSpec::Etcd => None,
    });
    let keys = || match &key_dir {
        Some(dir) => load_keys(dir, master_key_file.clone(), env.master_key.clone()),
        None if master_key_file.is_none() && env.master_key.is_none() => Err(format!(
            "no master key: give --master-key-file or {MASTER_KEY_ENV}"
        )),
        None => load_keys(
            Path::new("."),
            master_key_file.clone(),
            env.master_key.clone(),
        ),
    };
    let open = |spec: &StoreSpec, must_exist: bool| -> Result<Arc<dyn Store>, String> {
        match spec {
            StoreSpec::Embedded(dir) => {
                if must_exist && !dir.join(DATA_FILE).exists() {
                    return Err(format!(
                        "no store in {}: {DATA_FILE} does not exist",
                        dir.display()
                    ));
                }
                EmbeddedStore::open(dir, keys()?)
                    .map(|s| Arc::new(s) as Arc<dyn Store>)
                    .map_err(|e| format!("{}: {e}", dir.display()))
            }
            StoreSpec::Etcd => EtcdStore::new(etcd.clone(), keys()?, None)
                .map(|s| Arc::new(s) as Arc<dyn Store>)
                .map_err(|e| e.to_string()),
        }
    };
    let source = open(&from, true)?;
    let destination = if from == to {
        source.clone()
    } else {
        open(&to, false)?
    };
    copy(source.as_ref(), destination.as_ref(), overwrite, batch)
        .await
        .map_err(|e| e.to_string())
}

fn load_keys(
    data_dir: &Path,
    file: Option<PathBuf>,
    env: Option<String>,
) -> Result<MasterKeys, String> {
    let source = match (file, env.filter(|v| !v.is_empty())) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "give the master key with --master-key-file or {MASTER_KEY_ENV}, not both"
            ));
        }
        (Some(path), None) => MasterKeySource::File(path),
        (None, Some(value)) => MasterKeySource::Value(crate::secret::Secret::new(value)),
        (None, None) => {
            let generated = data_dir.join(GENERATED_KEY_FILE);
            if !generated.exists() {
                return Err(format!(
                    "no master key: give --master-key-file or {MASTER_KEY_ENV} ({} does not exist)",
                    generated.display()
                ));
            }
            MasterKeySource::File(generated)
        }
    };
    MasterKeys::load(&source, data_dir).map_err(|e| e.to_string())
}

fn describe(r: &VerifyReport) -> String {
    format!(
        "schema {}, revision {}, {} tenant{}, partner defaults {}",
        r.schema_version,
        r.revision,
        r.tenants,
        if r.tenants == 1 { "" } else { "s" },
        if r.partner_defaults { "set" } else { "unset" }
    )
}
