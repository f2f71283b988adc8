//! The teacher-embedding cache: the frozen teachers run once per distinct input, not at every
//! epoch as in the reference.
//!
//! A cache file holds, for each of `items` inputs, every teacher's raw `[1000]` output, in input
//! order. It is keyed by what determines those outputs: the teachers' sha256s, the dataset and
//! its items, and the preprocessing. A file whose key differs (stale) or whose checksum fails
//! (corrupt, truncated) is not used: [`EmbeddingCache::load_or_build`] rebuilds it.
//!
//! One cache folder may be shared by concurrent jobs on several hosts (a sweep's tasks): an
//! entry is built by one of them while the others wait for it (`.<file>.building` names the
//! builder and is touched every few seconds; a lock not touched for [`STALE_AFTER`] is a dead
//! builder's and is taken over), written under a name unique to its host, process and write,
//! then renamed into place, and verified (checksum, key, sizes) on every read.

use std::time::{Duration, SystemTime};
use std::{fs, path::Path, path::PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result, output::write_atomic};

const MAGIC: &[u8; 8] = b"MTADEMBC";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 32 + 8 + 4 + 4;

/// Teacher outputs for a list of inputs: `[item][teacher][dim]`, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingCache {
    /// sha256 of the cache key (see [`cache_key`]).
    pub key: [u8; 32],
    pub items: usize,
    pub teachers: usize,
    pub dim: usize,
    pub values: Vec<f32>,
}

/// How a cache came to be, for the run's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from disk: no teacher forward was needed.
    Reused,
    /// No file was there: computed and written.
    Built,
    /// A file was there but for other teachers, data or preprocessing: recomputed.
    RebuiltStale,
    /// A file was there but damaged: recomputed.
    RebuiltCorrupt,
}

/// The sha256 of a cache's description: anything that changes the teachers' outputs must be in
/// `description` (teacher sha256s, dataset, item list, preprocessing, image size).
pub fn cache_key(description: &str) -> [u8; 32] {
    Sha256::digest(description.as_bytes()).into()
}

impl EmbeddingCache {
    /// The outputs of teacher `t` for item `i`.
    pub fn get(&self, item: usize, teacher: usize) -> &[f32] {
        let start = (item * self.teachers + teacher) * self.dim;
        &self.values[start..start + self.dim]
    }

    /// Reads the cache at `path` if it exists and matches `key`; otherwise calls `build` (which
    /// returns `[item][teacher][dim]` values for `items` items) and writes the result atomically.
    pub fn load_or_build<F>(
        path: &Path,
        key: [u8; 32],
        items: usize,
        teachers: usize,
        dim: usize,
        build: F,
    ) -> Result<(Self, CacheOutcome)>
    where
        F: FnOnce() -> Result<Vec<f32>>,
    {
        let read = || -> Result<std::result::Result<Self, CacheOutcome>> {
            Ok(match fs::read(path) {
                Ok(bytes) => match Self::from_bytes(&bytes) {
                    Ok(cache)
                        if cache.key == key
                            && cache.items == items
                            && cache.teachers == teachers
                            && cache.dim == dim =>
                    {
                        Ok(cache)
                    }
                    Ok(_) => Err(CacheOutcome::RebuiltStale),
                    Err(_) => Err(CacheOutcome::RebuiltCorrupt),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CacheOutcome::Built),
                Err(e) => return Err(Error::io(path, e)),
            })
        };
        let mut outcome = match read()? {
            Ok(cache) => return Ok((cache, CacheOutcome::Reused)),
            Err(outcome) => outcome,
        };
        // One builder per entry: wait for another's, or build under the lock.
        let mut waited = false;
        let _lock = loop {
            if let Some(lock) = BuildLock::take(path)? {
                break lock;
            }
            if !waited {
                tracing::info!(
                    "teacher-embedding cache {}: another job is building it; waiting",
                    path.display()
                );
                waited = true;
            }
            std::thread::sleep(POLL);
            if let Ok(cache) = read()? {
                return Ok((cache, CacheOutcome::Reused));
            }
        };
        // Finished by another job between the first read and the lock.
        match read()? {
            Ok(cache) => return Ok((cache, CacheOutcome::Reused)),
            Err(now) if waited => outcome = now,
            Err(_) => {}
        }
        let values = build()?;
        if values.len() != items * teachers * dim {
            return Err(Error::InvalidArgument(format!(
                "embedding cache {}: built {} values, expected {items} x {teachers} x {dim}",
                path.display(),
                values.len()
            )));
        }
        let cache = Self {
            key,
            items,
            teachers,
            dim,
            values,
        };
        write_atomic(path, &cache.to_bytes())?;
        Ok((cache, outcome))
    }

    /// Reads the entry at `path` if it is a complete, undamaged cache (any key).
    pub fn read_verified(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|m| Error::invalid_file(path, m))
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 4 * self.values.len() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&(self.items as u64).to_le_bytes());
        out.extend_from_slice(&(self.teachers as u32).to_le_bytes());
        out.extend_from_slice(&(self.dim as u32).to_le_bytes());
        for v in &self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let checksum = Sha256::digest(&out);
        out.extend_from_slice(&checksum);
        out
    }

    fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() < HEADER_LEN + 32 || &bytes[..8] != MAGIC {
            return Err("not an embedding cache".to_string());
        }
        let (body, checksum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != checksum {
            return Err("checksum mismatch".to_string());
        }
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        if u32_at(8) != VERSION {
            return Err("another format version".to_string());
        }
        let key: [u8; 32] = body[12..44].try_into().expect("32 bytes");
        let items = u64::from_le_bytes(body[44..52].try_into().expect("8 bytes")) as usize;
        let teachers = u32_at(52) as usize;
        let dim = u32_at(56) as usize;
        let expected = items
            .checked_mul(teachers)
            .and_then(|n| n.checked_mul(dim))
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(HEADER_LEN));
        if expected != Some(body.len()) {
            return Err("size does not match the header".to_string());
        }
        let values = body[HEADER_LEN..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(Self {
            key,
            items,
            teachers,
            dim,
            values,
        })
    }
}

/// How often a waiting job looks for the entry, and a builder touches its lock.
const POLL: Duration = Duration::from_millis(250);
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A build lock not touched for this long belongs to a builder that died (on any host).
pub const STALE_AFTER: Duration = Duration::from_secs(120);

/// `.<file>.building` beside a cache entry while one job builds it; a thread keeps its
/// modification time fresh, and dropping it stops the thread and removes the file.
struct BuildLock {
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl BuildLock {
    fn path_for(entry: &Path) -> PathBuf {
        let name = entry
            .file_name()
            .map_or_else(|| "cache".into(), |n| n.to_string_lossy().into_owned());
        entry.with_file_name(format!(".{name}.building"))
    }

    /// The lock, or `None` while a live builder holds it (a stale one is removed first).
    fn take(entry: &Path) -> Result<Option<Self>> {
        use std::io::Write;
        let path = Self::path_for(entry);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let owner = crate::output::lock::host_name() + &format!(" pid {}", std::process::id());
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => {
                file.write_all(owner.as_bytes())
                    .map_err(|e| Error::io(&path, e))?;
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let heartbeat = {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let mut last = std::time::Instant::now();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            std::thread::sleep(POLL);
                            if last.elapsed() >= HEARTBEAT {
                                last = std::time::Instant::now();
                                let _ = file.set_modified(SystemTime::now());
                            }
                        }
                    })
                };
                Ok(Some(Self {
                    path,
                    stop,
                    heartbeat: Some(heartbeat),
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let age = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok());
                if age.is_some_and(|age| age > STALE_AFTER) {
                    tracing::warn!(
                        "{}: removing a build lock untouched for {:.0} s (its builder died: {})",
                        path.display(),
                        age.unwrap_or_default().as_secs_f64(),
                        fs::read_to_string(&path).unwrap_or_default()
                    );
                    let _ = fs::remove_file(&path);
                }
                Ok(None)
            }
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.5 - 3.0).collect()
    }

    #[test]
    fn built_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache/train.emb");
        let key = cache_key("teachers a,b; cifar10 train; resize 256 crop 224");
        let mut calls = 0;
        let (first, outcome) = EmbeddingCache::load_or_build(&path, key, 3, 2, 4, || {
            calls += 1;
            Ok(values(24))
        })
        .unwrap();
        assert_eq!(outcome, CacheOutcome::Built);
        let (second, outcome) =
            EmbeddingCache::load_or_build(&path, key, 3, 2, 4, || panic!("must not rebuild"))
                .unwrap();
        assert_eq!(outcome, CacheOutcome::Reused);
        assert_eq!(first, second);
        assert_eq!(calls, 1);
        assert_eq!(second.get(2, 1), &values(24)[20..24]);
    }

    #[test]
    fn stale_and_corrupt_caches_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.emb");
        let key = cache_key("teacher sha 1");
        EmbeddingCache::load_or_build(&path, key, 2, 1, 3, || Ok(values(6))).unwrap();

        // Other teachers: stale.
        let other = cache_key("teacher sha 2");
        let (cache, outcome) =
            EmbeddingCache::load_or_build(&path, other, 2, 1, 3, || Ok(vec![1.0; 6])).unwrap();
        assert_eq!(outcome, CacheOutcome::RebuiltStale);
        assert_eq!(cache.values, vec![1.0; 6]);

        // A flipped byte: corrupt.
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER_LEN + 2] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let (_, outcome) =
            EmbeddingCache::load_or_build(&path, other, 2, 1, 3, || Ok(vec![1.0; 6])).unwrap();
        assert_eq!(outcome, CacheOutcome::RebuiltCorrupt);

        // Truncated: corrupt.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let (_, outcome) =
            EmbeddingCache::load_or_build(&path, other, 2, 1, 3, || Ok(vec![1.0; 6])).unwrap();
        assert_eq!(outcome, CacheOutcome::RebuiltCorrupt);
    }

    #[test]
    fn concurrent_writers_build_an_entry_once_and_nobody_reads_it_torn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared/train.emb");
        let key = cache_key("shared");
        let builds = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        EmbeddingCache::load_or_build(&path, key, 50, 3, 100, || {
                            builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(300));
                            Ok(values(15_000))
                        })
                        .unwrap()
                        .0
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap().values, values(15_000));
            }
        });
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
        let left: Vec<String> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["train.emb"], "no lock or temporary file is left");
        assert_eq!(EmbeddingCache::read_verified(&path).unwrap().items, 50);
    }

    #[test]
    fn a_dead_builder_s_lock_is_taken_over_and_a_live_one_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.emb");
        let lock = BuildLock::path_for(&path);
        let file = fs::File::create(&lock).unwrap();
        file.set_modified(SystemTime::now() - STALE_AFTER * 2)
            .unwrap();
        let (_, outcome) =
            EmbeddingCache::load_or_build(&path, cache_key("k"), 1, 1, 2, || Ok(values(2)))
                .unwrap();
        assert_eq!(outcome, CacheOutcome::Built);
        assert!(!lock.exists());
        // A fresh lock (a live builder elsewhere): the entry it writes is read, not rebuilt.
        fs::remove_file(&path).unwrap();
        fs::write(&lock, b"other-host pid 1").unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(600));
                let cache = EmbeddingCache {
                    key: cache_key("k"),
                    items: 1,
                    teachers: 1,
                    dim: 2,
                    values: vec![7.0, 8.0],
                };
                write_atomic(&path, &cache.to_bytes()).unwrap();
                fs::remove_file(&lock).unwrap();
            });
            let (cache, outcome) =
                EmbeddingCache::load_or_build(&path, cache_key("k"), 1, 1, 2, || {
                    panic!("must wait for the other builder")
                })
                .unwrap();
            assert_eq!(outcome, CacheOutcome::Reused);
            assert_eq!(cache.values, vec![7.0, 8.0]);
        });
    }

    #[test]
    fn a_build_of_the_wrong_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.emb");
        let err = EmbeddingCache::load_or_build(&path, cache_key("k"), 2, 1, 3, || Ok(values(5)))
            .unwrap_err();
        assert!(err.to_string().contains("expected 2 x 1 x 3"));
        assert!(!path.exists());
    }
}
