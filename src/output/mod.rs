//! The run folder's formats, each with one reader and one writer: `config.json` and each
//! class's `progress.json` ([`run_folder`]), the reference's CSV tables ([`tables`]), the score
//! files ([`scores`]), the model artifact ([`artifact`]) and the report ([`report`]).
//!
//! Every file is written atomically: to a temporary name in the same folder, flushed to disk,
//! then renamed, so an interrupted run never leaves a half-written file.
//!
//! ```text
//! <out>/config.json                 every setting, the teachers and their sha256s
//! <out>/finTS_<student>.csv         Normal Class, Class Name, Epoch, AUC (oracle), nor
//! <out>/Eval_<student>.csv          per class: the 69 columns, nor, oracle; then a mean row
//! <out>/<class>/teacher_stats.bin   the class's teacher normalisation
//! <out>/<class>/model.mtad          the best evaluation's models, statistics, normalisation and
//!                                   threshold in one file (see `artifact`)
//! <out>/<class>/scores_test.csv     per test input: path, patch, label, AS_z, AS_cossim, AS_rec
//! <out>/<class>/scores_train.csv    the same for the normal training inputs (for nor)
//! <out>/<class>/progress.json       evaluations so far and the latest checkpoint
//! <out>/<class>/checkpoint/         model/optim/scheduler-<epoch>.bpk (no teacher weights),
//!                                   removed when the class is finished
//! <out>/<class>/burn/               Burn's training logs
//! <out>/run.log                     the log of every command run on the folder
//! ```

pub mod artifact;
pub mod detections;
pub mod lock;
pub mod plots;
pub mod report;
pub mod run_folder;
pub mod scores;
pub mod tables;

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The sha256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    crate::teachers::hex(&Sha256::digest(bytes))
}

/// The sha256 of a file's content, in lowercase hex, read in blocks.
pub fn file_sha256_hex(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::teachers::hex(&hasher.finalize()))
}

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::invalid_file(path, e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Reads a JSON file; errors name the file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::invalid_file(
            path,
            format!("not what mtad wrote ({e}): the file is damaged or was edited"),
        )
    })
}

/// Writes `bytes` to `path` atomically, creating the parent folder if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_parts(path, &[bytes])
}

/// Writes the concatenation of `parts` to `path` atomically (without joining them in memory).
pub fn write_atomic_parts(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file path", path.display())))?;
    let tmp = parent.join(format!(
        ".{}.tmp{}",
        file_name.to_string_lossy(),
        temporary_suffix()
    ));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        let mut writer = std::io::BufWriter::new(&mut file);
        for part in parts {
            writer.write_all(part)?;
        }
        writer.flush()?;
        drop(writer);
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// What makes a temporary file's name unique among every writer of a shared filesystem:
/// `<pid>-<host>-<n>`, the host as 8 hex digits of its name's sha256 (two hosts may run the
/// same pid) and `n` counting this process's writes (two threads may write the same file).
fn temporary_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let host = HOST.get_or_init(|| sha256_hex(lock::host_name().as_bytes())[..8].to_string());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{host}-{n}", std::process::id())
}

/// Whether `name` is a temporary file of [`write_atomic_parts`]: `.<name>.tmp<pid>` (older
/// versions) or `.<name>.tmp<pid>-<host>-<n>`.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
        && name.rsplit_once(".tmp").is_some_and(|(_, suffix)| {
            let parts: Vec<&str> = suffix.split('-').collect();
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            match parts.as_slice() {
                [pid] => digits(pid),
                [pid, host, n] => {
                    digits(pid)
                        && host.len() == 8
                        && host.bytes().all(|b| b.is_ascii_hexdigit())
                        && digits(n)
                }
                _ => false,
            }
        })
}

/// Removes the temporary files that a killed writer left in `dir` and in its subfolders down to
/// `depth` levels (a resumed run's folder: the run, its classes, their checkpoints); returns
/// how many. Only the caller may be writing there (it owns the folder).
pub fn remove_stale_temporaries(dir: &Path, depth: usize) -> Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() && depth > 0 {
            removed += remove_stale_temporaries(&path, depth - 1)?;
        } else if kind.is_file() && is_temporary(&entry.file_name().to_string_lossy()) {
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The PNG encoding of an image (`what` names it in the error).
pub fn png_bytes(image: &image::RgbImage, what: &str) -> Result<Vec<u8>> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::Training(format!("encoding {what}: {e}")))?;
    Ok(bytes.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/out.txt");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.txt")]);
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join("weave/checkpoint");
        fs::create_dir_all(&class).unwrap();
        for name in [
            ".model.mtad.tmp123",
            "checkpoint/.model-2.bpk.tmp9",
            ".scores.csv.tmp77-0a1b2c3d-4",
        ] {
            fs::write(dir.path().join("weave").join(name), b"half").unwrap();
        }
        for name in ["model.mtad", ".hidden", ".x.tmp", "a.tmp12", ".y.tmp1-zz-2"] {
            fs::write(dir.path().join("weave").join(name), b"kept").unwrap();
        }
        assert_eq!(remove_stale_temporaries(dir.path(), 2).unwrap(), 3);
        let mut left: Vec<String> = fs::read_dir(dir.path().join("weave"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".hidden",
                ".x.tmp",
                ".y.tmp1-zz-2",
                "a.tmp12",
                "checkpoint",
                "model.mtad"
            ]
        );
        assert!(fs::read_dir(&class).unwrap().next().is_none());
    }

    #[test]
    fn unwritable_target_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A folder where the file should go cannot be replaced by a file.
        let path = dir.path().join("taken");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("x"), b"x").unwrap();
        let err = write_atomic(&path, b"data").unwrap_err().to_string();
        assert!(err.contains("taken"), "{err}");
    }
}
