//! How the embedded store reaches its file: a [`BackendOpener`] gives redb a
//! [`StorageBackend`] for a path. Serving uses [`file_backend`]; tests pass an opener whose
//! backend wraps the file one and fails writes, syncs or reads on demand, to drive every
//! failure path of the store deterministically.

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Opens the storage of an existing database file for reading and writing.
pub type BackendOpener = Arc<dyn Fn(&Path) -> io::Result<Box<dyn StorageBackend>> + Send + Sync>;

/// The opener `sidekey serve` uses: the file itself.
pub fn file_backend(path: &Path) -> io::Result<Box<dyn StorageBackend>> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let backend = FileBackend::new(file).map_err(io::Error::other)?;
    Ok(Box::new(backend))
}

/// A boxed backend, as redb's constructors take an `impl StorageBackend`.
#[derive(Debug)]
pub(crate) struct Boxed(pub Box<dyn StorageBackend>);

type IoResult<T> = Result<T, io::Error>;
type LockResult<T> = Result<T, BackendError>;

impl StorageBackend for Boxed {
    fn len(&self) -> IoResult<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> IoResult<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> IoResult<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> IoResult<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> IoResult<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> IoResult<()> {
        self.0.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> LockResult<bool> {
        self.0.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> LockResult<bool> {
        self.0.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> LockResult<()> {
        self.0.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> LockResult<()> {
        self.0.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> LockResult<()> {
        self.0.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> LockResult<bool> {
        self.0.query_lock_range(start, end)
    }
}
