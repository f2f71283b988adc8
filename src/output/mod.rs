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

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::invalid_file(path, e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Reads a JSON file; errors name the file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid_file(path, e.to_string()))
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
        std::process::id()
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
