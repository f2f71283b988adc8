//! One run folder, one writer: `<out>/.mtad.lock` names the process that owns the folder (its
//! host, pid and start time). A second `train` on the same folder is refused with the owner's
//! name; a lock whose process is gone (same host, no such pid) is stale and taken over with a
//! warning. A lock of another host cannot be checked from here: the error says how to remove it
//! once that process is known to be gone.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The lock file's name in a run folder.
pub const LOCK_FILE: &str = ".mtad.lock";

/// Who holds a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    /// Seconds since the Unix epoch when the lock was taken.
    pub since: u64,
    /// What the owner is doing (`train`, ...).
    pub command: String,
}

impl Owner {
    fn this_process(command: &str) -> Self {
        Self {
            host: host_name(),
            pid: std::process::id(),
            since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            command: command.to_string(),
        }
    }
}

/// A held lock; dropping it removes the file.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `dir` (which must exist) for `command`.
    pub fn acquire(dir: &Path, command: &str) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let me = Owner::this_process(command);
        let text = serde_json::to_string(&me).expect("a lock owner serialises");
        // Twice at most: once more after removing a stale lock.
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(text.as_bytes())
                        .and_then(|_| file.sync_all())
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = read_owner(&path);
                    match owner {
                        Some(owner) if owner.host == me.host && !process_alive(owner.pid) => {
                            tracing::warn!(
                                "{}: removing the stale lock of {} (pid {} on {}, since {}), \
                                 whose process is gone",
                                dir.display(),
                                owner.command,
                                owner.pid,
                                owner.host,
                                owner.since
                            );
                            remove_if_same(&path, &owner)?;
                        }
                        Some(owner) => {
                            return Err(Error::InvalidArgument(format!(
                                "{} is in use by `mtad {}` (pid {} on host {}, since {} s after \
                                 1970): one process writes a run folder at a time. Wait for it, \
                                 or stop it; if it is gone (a crashed host), delete {}",
                                dir.display(),
                                owner.command,
                                owner.pid,
                                owner.host,
                                owner.since,
                                path.display()
                            )));
                        }
                        None => {
                            // Unreadable: being written this instant, or damaged.
                            return Err(Error::InvalidArgument(format!(
                                "{} is locked by another process ({} cannot be read as a \
                                 lock); if no mtad process uses the folder, delete that file",
                                dir.display(),
                                path.display()
                            )));
                        }
                    }
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::InvalidArgument(format!(
            "{}: another process took the lock of the folder at the same time; try again",
            dir.display()
        )))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Only our own lock: never a lock another process took after removing ours as stale.
        if read_owner(&self.path)
            .is_some_and(|o| o.pid == std::process::id() && o.host == host_name())
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The owner named in a lock file, if it can be read.
pub fn read_owner(path: &Path) -> Option<Owner> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Removes the lock file if it still names `owner` (not a newer lock).
fn remove_if_same(path: &Path, owner: &Owner) -> Result<()> {
    if read_owner(path).as_ref() == Some(owner) {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(())
}

/// This machine's host name (`unknown-host` if it cannot be read).
pub fn host_name() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
        // truncates, and the last byte stays 0.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
        if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            if let Ok(name) = std::str::from_utf8(&buf[..end]) {
                if !name.is_empty() {
                    return name.to_string();
                }
            }
        }
    }
    std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown-host".into())
}

/// Whether a process `pid` exists on this host.
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        if pid <= 0 {
            return false;
        }
        // SAFETY: signal 0 checks existence and permission only; nothing is sent.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn a_second_owner_is_refused_with_the_first_named() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path(), "train").unwrap();
        let err = RunLock::acquire(dir.path(), "train")
            .unwrap_err()
            .to_string();
        assert!(err.contains("in use by `mtad train`"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains(&host_name()), "{err}");
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        RunLock::acquire(dir.path(), "train").unwrap();
    }

    #[test]
    fn a_stale_lock_is_taken_over_and_another_hosts_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let stale = Owner {
            pid: dead_pid(),
            ..Owner::this_process("train")
        };
        std::fs::write(&path, serde_json::to_string(&stale).unwrap()).unwrap();
        let lock = RunLock::acquire(dir.path(), "train").unwrap();
        assert_eq!(read_owner(lock.path()).unwrap().pid, std::process::id());
        drop(lock);

        let remote = Owner {
            host: "elsewhere".into(),
            ..stale
        };
        std::fs::write(&path, serde_json::to_string(&remote).unwrap()).unwrap();
        let err = RunLock::acquire(dir.path(), "train")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("host elsewhere") && err.contains("delete"),
            "{err}"
        );
        std::fs::write(&path, b"{garbage").unwrap();
        let err = RunLock::acquire(dir.path(), "train")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be read as a lock"), "{err}");
    }

    #[test]
    fn processes_are_told_apart() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(dead_pid()));
        assert!(!process_alive(0));
    }
}
