//! One writer per run folder: an advisory lock on `RUN/.lock`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside a run folder. It stays after a run ends; only the OS lock on
/// it matters, and the OS drops that when its holder exits, killed or not.
pub const LOCK_FILE: &str = ".lock";

/// The exclusive lock on a run folder, held while a run writes into it (released on drop, or by
/// the OS when the process dies). A second [`RunLock::acquire`] on the same folder, from this
/// process or another, fails at once naming the folder and the holder's process id.
///
/// ```
/// use ddpm_trainer::RunLock;
///
/// # fn main() -> candle_core::Result<()> {
/// let dir = tempfile::tempdir()?;
/// let lock = RunLock::acquire(dir.path())?;
/// lock.claim()?; // records this process as the holder
/// let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
/// assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
/// drop(lock);
/// assert!(RunLock::acquire(dir.path()).is_ok());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RunLock {
    file: File,
    root: PathBuf,
}

impl RunLock {
    /// Locks the run folder `root`, which must exist. Nothing is written into the lock file
    /// until [`RunLock::claim`], so taking the lock and giving up (a refused run) leaves the
    /// folder as it was.
    pub fn acquire(root: &Path) -> candle_core::Result<Self> {
        let path = root.join(LOCK_FILE);
        let io = |e: std::io::Error| {
            candle_core::Error::Msg(format!("locking run folder {}: {e}", root.display()))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self {
                file,
                root: root.to_path_buf(),
            }),
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "a process that has not yet recorded its pid".to_string(),
                };
                candle_core::bail!(
                    "run folder {} is in use by another ddpm process ({holder}); wait for it to finish or stop it",
                    root.display()
                )
            }
            Err(TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// Records this process's id in the lock file, for the error a second writer gets.
    pub fn claim(&self) -> candle_core::Result<()> {
        let mut file = &self.file;
        let io = |e: std::io::Error| {
            candle_core::Error::Msg(format!("locking run folder {}: {e}", self.root.display()))
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// The locked folder.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
