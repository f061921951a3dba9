//! One controller per SQLite file. SQLite has no leader election, so two
//! controllers on one file would both drive every operation: the second
//! one refuses to start, naming the first. The lock is `flock` on
//! `<store>.lock` (released by the kernel when the process ends, however it
//! ends), and the file says who holds it.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::StoreError;

/// Held while the controller runs; dropping it releases the file.
pub struct SqliteLock {
    _lock: Flock<std::fs::File>,
}

/// The lock file of an SQLite store.
pub fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

impl SqliteLock {
    /// Takes the store's lock, or says which process holds it.
    pub fn acquire(store: &Path) -> Result<SqliteLock, StoreError> {
        let path = lock_path(store);
        // Before the store opens: its directory may not exist yet.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.display().to_string(), source })?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| StoreError::LockFile { path: path.display().to_string(), source })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let me = format!(
                    "pid {} on {}, since {}",
                    std::process::id(),
                    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
                    crate::domain::model::now_ms()
                );
                let written = lock.set_len(0).and_then(|()| lock.rewind()).and_then(|()| lock.write_all(me.as_bytes()));
                if let Err(e) = written {
                    tracing::warn!(lock = %path.display(), error = %e, "cannot write who holds the store's lock");
                }
                Ok(SqliteLock { _lock: lock })
            }
            Err((mut file, _)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = if holder.trim().is_empty() { "another process".to_owned() } else { holder.trim().to_owned() };
                Err(StoreError::Locked { store: store.display().to_string(), holder })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A store whose directory does not exist yet (a first start).
        let store = dir.path().join("new/s.db");
        let first = SqliteLock::acquire(&store).expect("first");
        let err = SqliteLock::acquire(&store).err().expect("a second one is refused").to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains("s.db"), "{err}");
        drop(first);
        SqliteLock::acquire(&store).expect("free again");
    }
}
