//! The teacher-embedding cache: the frozen teachers run once per distinct input, not at every
//! epoch as in the reference.
//!
//! A cache file holds, for each of `items` inputs, every teacher's raw `[1000]` output, in input
//! order. It is keyed by what determines those outputs: the teachers' sha256s, the dataset and
//! its items, and the preprocessing. A file whose key differs (stale) or whose checksum fails
//! (corrupt, truncated) is not used: [`EmbeddingCache::load_or_build`] rebuilds it.

use std::{fs, path::Path};

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
        let outcome = match fs::read(path) {
            Ok(bytes) => match Self::from_bytes(&bytes) {
                Ok(cache)
                    if cache.key == key
                        && cache.items == items
                        && cache.teachers == teachers
                        && cache.dim == dim =>
                {
                    return Ok((cache, CacheOutcome::Reused));
                }
                Ok(_) => CacheOutcome::RebuiltStale,
                Err(_) => CacheOutcome::RebuiltCorrupt,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CacheOutcome::Built,
            Err(e) => return Err(Error::io(path, e)),
        };
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
    fn a_build_of_the_wrong_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.emb");
        let err = EmbeddingCache::load_or_build(&path, cache_key("k"), 2, 1, 3, || Ok(values(5)))
            .unwrap_err();
        assert!(err.to_string().contains("expected 2 x 1 x 3"));
        assert!(!path.exists());
    }
}
