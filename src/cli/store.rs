//! `sidekey store backup|verify`: offline-safe tools on the embedded store's file. Both open
//! it read-only, so they run beside a live `sidekey serve` (which opens it in redb's
//! single-writer mode, letting readers share the file) and never change it.

use std::path::{Path, PathBuf};

use clap::Subcommand;

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
}

/// Runs a store command; the line to print, or the error.
pub fn run(command: StoreCommand, master_key_env: Option<String>) -> Result<String, String> {
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
    }
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
