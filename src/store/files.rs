//! Creating the data directory and the files in it so that only their owner can read them.
//!
//! Both the generated master key and the database live in `--data-dir`; each is created
//! private from its first byte (mode set at creation, not by a later chmod, so there is no
//! window in which another user could open it).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The database file inside the data directory. Declared here, with the other facts about
/// the data directory, so that the master key (which looks for it) and the embedded store
/// (which writes it) do not import each other.
pub const DATA_FILE: &str = "sidekey.redb";

/// Mode of a data directory sidekey creates: owner only.
pub(crate) const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of a file sidekey creates in the data directory: owner read/write only.
pub(crate) const PRIVATE_FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with mode 0700 if it does not exist. An existing
/// directory is left as it is: the operator may have chosen its permissions on purpose (a
/// mounted volume, say), and the files sidekey creates in it are 0600 whatever the directory.
pub(crate) fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(dir),
        Err(e) => Err(e),
    }
}

/// Creates `path` with mode 0600, failing if it already exists.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
}

/// Flushes a directory's entries, so that a file just created or linked in it survives a
/// crash (fsync of the file alone does not persist its name).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
