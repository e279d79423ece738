//! The master keyring: where the keys that seal secrets at rest come from, and their ids.
//!
//! A ring holds an active key, which seals everything written, and older keys kept only so
//! that what they sealed can still be opened until the store re-seals it under the active key
//! (rotation). Each key is named by a [`KeyId`] derived from the key itself, so a sealed value
//! says which key opens it without revealing anything about that key.
//!
//! Key text format (file or value): one or more 32-byte keys, each as standard base64 (44
//! characters) or 64 hex digits, separated by newlines or commas; blank lines and `#`
//! comments are ignored. The FIRST key is the active one.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::StoreError;
use super::files;

/// Length of a master key in bytes (AES-256).
pub const KEY_LEN: usize = 32;

/// The file, inside the data directory, that a generated master key is written to when
/// neither `--master-key-file` nor `SIDEKEY_MASTER_KEY` is given.
pub const GENERATED_KEY_FILE: &str = "master.key";

/// The environment variable whose value is the key text; named in messages that tell the
/// operator how to supply a key.
pub const MASTER_KEY_ENV: &str = "SIDEKEY_MASTER_KEY";

/// Prefix hashed with the key to derive its id, so the id is never a plain hash of the key
/// that could be matched against a hash computed elsewhere.
const KEY_ID_DOMAIN: &[u8] = b"sidekey master key id v1\0";

/// Where the master keys come from. Built by the configuration from the flags.
#[derive(Clone, Debug)]
pub enum MasterKeySource {
    /// `--master-key-file PATH`.
    File(PathBuf),
    /// The key text itself, from `SIDEKEY_MASTER_KEY`.
    Value(crate::secret::Secret),
    /// Neither given: use `<data-dir>/master.key`, generating it on first start.
    Generate,
}

/// Names a master key: the first 4 bytes (8 hex digits) of SHA-256 over a domain prefix and
/// the key. Enough to tell the keys of one ring apart; reveals nothing usable about the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 4]);

impl KeyId {
    fn of(key: &[u8; KEY_LEN]) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(KEY_ID_DOMAIN);
        ctx.update(key);
        let digest = ctx.finish();
        let mut id = [0u8; 4];
        id.copy_from_slice(&digest.as_ref()[..4]);
        Self(id)
    }

    /// Parses the 8 lower- or upper-case hex digits that [`fmt::Display`] writes.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 8 {
            return None;
        }
        let mut id = [0u8; 4];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(id))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// One 32-byte master key and its id. The bytes are zeroed on drop and never printed.
pub struct MasterKey {
    id: KeyId,
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl MasterKey {
    fn new(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self {
            id: KeyId::of(&bytes),
            bytes,
        }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The raw key. Only [`super::sealing`] reads it.
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("key", &format_args!("<redacted>"))
            .finish()
    }
}

/// The keyring: the active key first, then older keys kept to open what they sealed.
#[derive(Debug)]
pub struct MasterKeys {
    active: MasterKey,
    older: Vec<MasterKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("cannot read the master key file {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot create the master key file {}: {source}", .path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot create the data directory {}: {source}", .path.display())]
    DataDir { path: PathBuf, source: io::Error },
    #[error(
        "{origin} holds no master key: expected one or more 32-byte keys, each as 44 characters \
         of standard base64 or 64 hex digits, one per line"
    )]
    Empty { origin: String },
    #[error("{origin}: {reason}")]
    Invalid { origin: String, reason: String },
    #[error(
        "the data directory {} holds a database but no {GENERATED_KEY_FILE}, and no master key \
         was supplied: supply the key its secrets were sealed with (--master-key-file or \
         {MASTER_KEY_ENV})", .data_dir.display()
    )]
    MissingForExistingData { data_dir: PathBuf },
    #[error("the system random number generator failed while generating a master key")]
    Random,
}

impl From<MasterKeyError> for StoreError {
    fn from(e: MasterKeyError) -> Self {
        StoreError::Key(e.to_string())
    }
}

impl MasterKeys {
    /// Loads the keyring from `source`. With [`MasterKeySource::Generate`], uses
    /// `<data_dir>/master.key`, creating the directory (0700) and a new random key (0600) when
    /// absent; either way it warns that the key sits beside the data it protects. When the
    /// directory already holds a database but no key file, it refuses rather than generate a
    /// key that could not open that data.
    pub fn load(source: &MasterKeySource, data_dir: &Path) -> Result<Self, MasterKeyError> {
        match source {
            MasterKeySource::File(path) => {
                warn_if_readable_by_others(path);
                Self::parse(&read_key_file(path)?, &path.display().to_string())
            }
            MasterKeySource::Value(value) => Self::parse(value.expose(), MASTER_KEY_ENV),
            MasterKeySource::Generate => Self::load_or_generate(data_dir),
        }
    }

    /// Parses key text (see the module doc for its format). `origin` names where the text came
    /// from, for error messages; errors say which entry is wrong and why, never its content.
    pub fn parse(text: &str, origin: &str) -> Result<Self, MasterKeyError> {
        let invalid = |reason: String| MasterKeyError::Invalid {
            origin: origin.to_owned(),
            reason,
        };
        let mut keys: Vec<MasterKey> = Vec::new();
        for (line_no, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default();
            for entry in line.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let n = keys.len() + 1;
                let bytes = decode_key(entry).ok_or_else(|| {
                    invalid(format!(
                        "key {n} (line {}) is not a 32-byte key: expected 44 characters of \
                         standard base64 or 64 hex digits, found {} characters",
                        line_no + 1,
                        entry.chars().count()
                    ))
                })?;
                let key = MasterKey::new(bytes);
                if let Some(pos) = keys.iter().position(|k| k.id == key.id) {
                    return Err(invalid(format!(
                        "key {n} (line {}) repeats key {} (id {})",
                        line_no + 1,
                        pos + 1,
                        key.id
                    )));
                }
                keys.push(key);
            }
        }
        let mut keys = keys.into_iter();
        let active = keys.next().ok_or_else(|| MasterKeyError::Empty {
            origin: origin.to_owned(),
        })?;
        Ok(Self {
            active,
            older: keys.collect(),
        })
    }

    /// A new random key as key text (standard base64), for generating key files.
    pub fn generate_key_text() -> Result<crate::secret::Secret, MasterKeyError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| MasterKeyError::Random)?;
        Ok(crate::secret::Secret::new(STANDARD.encode(bytes.as_ref())))
    }

    /// The key that seals everything written.
    pub fn active(&self) -> &MasterKey {
        &self.active
    }

    /// The key with this id, active or older.
    pub fn get(&self, id: KeyId) -> Option<&MasterKey> {
        self.keys().find(|k| k.id == id)
    }

    /// The ids of every key in the ring, active first.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys().map(|k| k.id)
    }

    fn keys(&self) -> impl Iterator<Item = &MasterKey> {
        std::iter::once(&self.active).chain(&self.older)
    }

    fn load_or_generate(data_dir: &Path) -> Result<Self, MasterKeyError> {
        let path = data_dir.join(GENERATED_KEY_FILE);
        let data_file = data_dir.join(super::files::DATA_FILE);
        files::ensure_private_dir(data_dir).map_err(|source| MasterKeyError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let keys = match fs::symlink_metadata(&path) {
            Ok(_) => Self::parse(&read_key_file(&path)?, &path.display().to_string())?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if data_file.exists() {
                    return Err(MasterKeyError::MissingForExistingData {
                        data_dir: data_dir.to_owned(),
                    });
                }
                let text = Self::generate_key_text()?;
                write_generated_key(&path, text.expose())?;
                tracing::info!(path = %path.display(), "generated a new master key");
                Self::parse(text.expose(), &path.display().to_string())?
            }
            Err(source) => return Err(MasterKeyError::Read { path, source }),
        };
        tracing::warn!(
            path = %path.display(),
            key_id = %keys.active().id(),
            "the master key is stored in the data directory, beside the secrets it protects: \
             anyone who can read the directory can decrypt them. Supply the key with \
             --master-key-file (e.g. a mounted Kubernetes Secret) or {MASTER_KEY_ENV} instead"
        );
        Ok(keys)
    }
}

fn read_key_file(path: &Path) -> Result<Zeroizing<String>, MasterKeyError> {
    fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|source| MasterKeyError::Read {
            path: path.to_owned(),
            source,
        })
}

/// Writes the generated key with mode 0600, failing rather than overwriting if another
/// process created the file meanwhile, and makes both file and name durable before any data
/// is sealed with the key: losing the key after that would lose every secret.
fn write_generated_key(path: &Path, key_text: &str) -> Result<(), MasterKeyError> {
    let create_err = |source| MasterKeyError::Create {
        path: path.to_owned(),
        source,
    };
    let mut file = files::create_private_file(path).map_err(create_err)?;
    let contents = Zeroizing::new(format!(
        "# sidekey master key, generated because neither --master-key-file nor {MASTER_KEY_ENV} \
         was given.\n# Keep a copy elsewhere: without it the secrets in this directory cannot be \
         read.\n{key_text}\n"
    ));
    file.write_all(contents.as_bytes()).map_err(create_err)?;
    file.sync_all().map_err(create_err)?;
    if let Some(dir) = path.parent() {
        files::sync_dir(dir).map_err(create_err)?;
    }
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        // Group read is accepted: a Kubernetes Secret volume can only give a non-root
        // process its files through the pod's fsGroup (mode 0440). Anything for all users,
        // or group write, is worth a warning.
        if mode & 0o027 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777),
                "the master key file is accessible to other users; 0600, 0400 or 0440 is recommended");
        }
    }
}

fn decode_key(entry: &str) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    match entry.len() {
        44 => {
            let decoded = Zeroizing::new(STANDARD.decode(entry).ok()?);
            if decoded.len() != KEY_LEN {
                return None;
            }
            key.copy_from_slice(&decoded);
        }
        64 => {
            for (i, byte) in key.iter_mut().enumerate() {
                *byte = u8::from_str_radix(entry.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
        }
        _ => return None,
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const HEX_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn b64(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    #[test]
    fn hex_and_base64_give_the_same_key() {
        let bytes: Vec<u8> = (0u8..32).collect();
        let from_hex = MasterKeys::parse(HEX_A, "t").unwrap();
        let from_b64 = MasterKeys::parse(&b64(&bytes), "t").unwrap();
        assert_eq!(from_hex.active().id(), from_b64.active().id());
        assert_eq!(from_hex.active().bytes().as_slice(), bytes.as_slice());
    }

    #[test]
    fn first_key_is_active_and_comments_blank_lines_commas_are_ignored() {
        let other = b64(&[7u8; 32]);
        let text = format!("# rotate: new first\n\n  {other}  # new\n{HEX_A}\n");
        let ring = MasterKeys::parse(&text, "t").unwrap();
        let ids: Vec<_> = ring.ids().collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(ring.active().id(), ids[0]);
        let one = MasterKeys::parse(&other, "t").unwrap();
        assert_eq!(ring.active().id(), one.active().id());

        let env = format!("{other},{HEX_A}");
        let from_env = MasterKeys::parse(&env, "t").unwrap();
        assert_eq!(from_env.ids().collect::<Vec<_>>(), ids);
        assert!(from_env.get(ids[1]).is_some());
    }

    #[test]
    fn errors_name_origin_and_entry_but_not_the_key() {
        let bad = "not-a-key-but-a-secret-looking-string";
        let err = MasterKeys::parse(&format!("{HEX_A}\n{bad}"), "/etc/k").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/etc/k") && msg.contains("key 2 (line 2)"),
            "{msg}"
        );
        assert!(!msg.contains(bad) && !msg.contains(HEX_A), "{msg}");

        // 44 base64 characters that decode to 33 bytes, and 64 non-hex characters.
        for wrong in [b64(&[1u8; 33])[..44].to_owned(), "g".repeat(64)] {
            assert!(MasterKeys::parse(&wrong, "t").is_err(), "{wrong}");
        }

        let msg = MasterKeys::parse("# only a comment\n\n", "SIDEKEY_MASTER_KEY")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("SIDEKEY_MASTER_KEY holds no master key"),
            "{msg}"
        );

        let msg = MasterKeys::parse(&format!("{HEX_A}\n{HEX_A}"), "t")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("repeats key 1"), "{msg}");
    }

    #[test]
    fn key_id_is_stable_and_round_trips() {
        let ring = MasterKeys::parse(HEX_A, "t").unwrap();
        let id = ring.active().id();
        let text = id.to_string();
        assert_eq!(text.len(), 8);
        assert_eq!(KeyId::parse(&text), Some(id));
        assert_eq!(KeyId::parse("xyz"), None);
        assert_eq!(KeyId::parse("0123456g"), None);
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let ring = MasterKeys::parse(HEX_A, "t").unwrap();
        let dbg = format!("{ring:?}");
        assert!(dbg.contains("<redacted>"));
        assert!(
            !dbg.contains("0, 1, 2, 3") && !dbg.contains("000102"),
            "{dbg}"
        );
    }

    #[test]
    fn generate_creates_a_private_file_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let first = MasterKeys::load(&MasterKeySource::Generate, &data_dir).unwrap();
        let path = data_dir.join(GENERATED_KEY_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);

        let again = MasterKeys::load(&MasterKeySource::Generate, &data_dir).unwrap();
        assert_eq!(first.active().id(), again.active().id());
    }

    #[test]
    fn generate_refuses_when_data_exists_without_its_key() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(crate::store::files::DATA_FILE), b"x").unwrap();
        let err = MasterKeys::load(&MasterKeySource::Generate, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds a database but no master.key"), "{err}");
        assert!(!dir.path().join(GENERATED_KEY_FILE).exists());
    }

    #[test]
    fn file_and_value_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, format!("{HEX_A}\n")).unwrap();
        let from_file = MasterKeys::load(&MasterKeySource::File(path), dir.path()).unwrap();
        let value = MasterKeySource::Value(crate::secret::Secret::new(HEX_A));
        let from_value = MasterKeys::load(&value, dir.path()).unwrap();
        assert_eq!(from_file.active().id(), from_value.active().id());

        let missing = dir.path().join("absent");
        let err = MasterKeys::load(&MasterKeySource::File(missing), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read the master key file") && err.contains("absent"));
    }
}
