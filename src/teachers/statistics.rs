//! Per-class teacher normalisation (METHOD.md): over the normal training inputs of a class, the
//! per-dimension mean and *unbiased* standard deviation (as `torch.std`) of each teacher's 1000
//! outputs; a std of exactly 0 becomes 1e-3. Then `z_i = (T_i(x) - mean_i) / std_i`.
//!
//! The statistics are accumulated in one streaming pass (Chan et al.'s parallel update of
//! Welford's algorithm, in f64) and saved in a small checksummed binary file that reloads bit
//! for bit (the reference's `meanstd<class>.data`).

use std::path::Path;

use burn::prelude::*;
use sha2::{Digest, Sha256};

use crate::{Error, Result, output::write_atomic};

/// A std of exactly zero is replaced by this, as in the reference.
pub const ZERO_STD_REPLACEMENT: f32 = 1e-3;

const MAGIC: &[u8; 8] = b"MTADSTAT";
const VERSION: u32 = 1;

/// Streaming accumulator of per-dimension mean and variance for several teachers.
#[derive(Debug, Clone)]
pub struct StatisticsAccumulator {
    dim: usize,
    count: u64,
    /// `[teacher][dim]`
    mean: Vec<Vec<f64>>,
    /// Sum of squared deviations from the mean, `[teacher][dim]`.
    m2: Vec<Vec<f64>>,
}

impl StatisticsAccumulator {
    pub fn new(teachers: usize, dim: usize) -> Self {
        Self {
            dim,
            count: 0,
            mean: vec![vec![0.0; dim]; teachers],
            m2: vec![vec![0.0; dim]; teachers],
        }
    }

    /// Adds one batch: one `[N, dim]` tensor per teacher.
    pub fn update(&mut self, outputs: &[Tensor<2>]) -> Result<()> {
        let host = outputs
            .iter()
            .map(|t| {
                let [n, d] = t.dims();
                let values = t
                    .clone()
                    .into_data()
                    .try_into_vec::<f32>()
                    .map_err(|e| Error::InvalidArgument(format!("teacher output: {e:?}")))?;
                Ok((n, d, values))
            })
            .collect::<Result<Vec<_>>>()?;
        let rows: Vec<(usize, &[f32])> = host
            .iter()
            .map(|(n, d, v)| {
                debug_assert_eq!(v.len(), n * d);
                (*n, v.as_slice())
            })
            .collect();
        if host.iter().any(|(_, d, _)| *d != self.dim) {
            return Err(Error::InvalidArgument(format!(
                "teacher outputs must have {} dimensions",
                self.dim
            )));
        }
        self.update_host(&rows)
    }

    /// Adds one batch given on the host: per teacher, `(N, values)` with `N * dim` values.
    pub fn update_host(&mut self, batch: &[(usize, &[f32])]) -> Result<()> {
        if batch.len() != self.mean.len() {
            return Err(Error::InvalidArgument(format!(
                "expected outputs of {} teachers, got {}",
                self.mean.len(),
                batch.len()
            )));
        }
        let n_b = batch[0].0;
        if n_b == 0 {
            return Ok(());
        }
        if batch
            .iter()
            .any(|(n, v)| *n != n_b || v.len() != n_b * self.dim)
        {
            return Err(Error::InvalidArgument(
                "every teacher's output must have the same batch size and width".to_string(),
            ));
        }
        let n_a = self.count as f64;
        let n_b_f = n_b as f64;
        let n = n_a + n_b_f;
        for (t, (_, values)) in batch.iter().enumerate() {
            for j in 0..self.dim {
                let column = (0..n_b).map(|i| values[i * self.dim + j] as f64);
                let batch_mean = column.clone().sum::<f64>() / n_b_f;
                let batch_m2: f64 = column.map(|x| (x - batch_mean) * (x - batch_mean)).sum();
                let delta = batch_mean - self.mean[t][j];
                self.mean[t][j] += delta * n_b_f / n;
                self.m2[t][j] += batch_m2 + delta * delta * n_a * n_b_f / n;
            }
        }
        self.count += n_b as u64;
        Ok(())
    }

    /// The finished statistics. Needs at least two inputs for an unbiased std.
    pub fn finish(
        self,
        teachers: Vec<String>,
        teacher_sha256: Vec<String>,
    ) -> Result<TeacherStatistics> {
        if self.count < 2 {
            return Err(Error::InvalidArgument(format!(
                "teacher statistics need at least 2 inputs, got {}",
                self.count
            )));
        }
        if teachers.len() != self.mean.len() || teacher_sha256.len() != self.mean.len() {
            return Err(Error::InvalidArgument(
                "one name and one sha256 per teacher".to_string(),
            ));
        }
        let denominator = (self.count - 1) as f64;
        let std = self
            .m2
            .iter()
            .map(|m2| {
                m2.iter()
                    .map(|&m| {
                        let s = (m / denominator).sqrt() as f32;
                        if s == 0.0 { ZERO_STD_REPLACEMENT } else { s }
                    })
                    .collect()
            })
            .collect();
        let mean = self
            .mean
            .iter()
            .map(|m| m.iter().map(|&x| x as f32).collect())
            .collect();
        Ok(TeacherStatistics {
            teachers,
            teacher_sha256,
            count: self.count,
            mean,
            std,
        })
    }
}

/// The saved normalisation of each teacher for one class.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherStatistics {
    /// Teacher names, in ensemble order.
    pub teachers: Vec<String>,
    /// The teachers' ONNX sha256s: statistics are only valid for these exact teachers.
    pub teacher_sha256: Vec<String>,
    /// How many inputs they were computed on.
    pub count: u64,
    /// `[teacher][1000]`
    pub mean: Vec<Vec<f32>>,
    /// `[teacher][1000]`, never zero.
    pub std: Vec<Vec<f32>>,
}

impl TeacherStatistics {
    /// `z_i = (T_i(x) - mean_i) / std_i` for each teacher's `[N, 1000]` output.
    pub fn z_scores(&self, outputs: &[Tensor<2>]) -> Result<Vec<Tensor<2>>> {
        if outputs.len() != self.mean.len() {
            return Err(Error::InvalidArgument(format!(
                "statistics are for {} teachers, got {} outputs",
                self.mean.len(),
                outputs.len()
            )));
        }
        Ok(outputs
            .iter()
            .enumerate()
            .map(|(t, out)| {
                let device = out.device();
                let dim = self.mean[t].len();
                let mean =
                    Tensor::<1>::from_floats(self.mean[t].as_slice(), &device).reshape([1, dim]);
                let std =
                    Tensor::<1>::from_floats(self.std[t].as_slice(), &device).reshape([1, dim]);
                (out.clone() - mean) / std
            })
            .collect())
    }

    /// Saves the statistics atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes())
    }

    /// Loads statistics saved by [`TeacherStatistics::save`], checking their integrity.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|m| Error::invalid_file(path, m))
    }

    /// The file's bytes (what [`TeacherStatistics::save`] writes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let dim = self.mean.first().map_or(0, Vec::len);
        let mut out = Vec::with_capacity(64 + 8 * self.mean.len() * dim);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.teachers.len() as u32).to_le_bytes());
        out.extend_from_slice(&(dim as u32).to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        for (name, sha) in self.teachers.iter().zip(&self.teacher_sha256) {
            for s in [name, sha] {
                out.extend_from_slice(&(s.len() as u16).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
        for values in self.mean.iter().chain(&self.std) {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        let checksum = Sha256::digest(&out);
        out.extend_from_slice(&checksum);
        out
    }

    /// Reads [`TeacherStatistics::to_bytes`], checking the checksum.
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        const NOT_STATS: &str = "not a teacher statistics file";
        if bytes.len() < MAGIC.len() + 32 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(NOT_STATS.to_string());
        }
        let (body, checksum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != checksum {
            return Err("checksum mismatch: the file is truncated or corrupt".to_string());
        }
        let mut reader = Reader {
            bytes: body,
            pos: MAGIC.len(),
        };
        let version = reader.u32()?;
        if version != VERSION {
            return Err(format!("format version {version}, expected {VERSION}"));
        }
        let teachers = reader.u32()? as usize;
        let dim = reader.u32()? as usize;
        let count = reader.u64()?;
        if teachers == 0 || teachers > 16 || dim == 0 || dim > 1 << 20 {
            return Err(format!("implausible shape: {teachers} teachers x {dim}"));
        }
        let mut names = Vec::with_capacity(teachers);
        let mut shas = Vec::with_capacity(teachers);
        for _ in 0..teachers {
            names.push(reader.string()?);
            shas.push(reader.string()?);
        }
        let mut read_block = || {
            (0..teachers)
                .map(|_| {
                    (0..dim)
                        .map(|_| reader.f32())
                        .collect::<std::result::Result<Vec<_>, _>>()
                })
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        let mean = read_block()?;
        let std = read_block()?;
        if reader.pos != body.len() {
            return Err("trailing bytes after the statistics".to_string());
        }
        Ok(Self {
            teachers: names,
            teacher_sha256: shas,
            count,
            mean,
            std,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| "unexpected end of file".to_string())?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f32(&mut self) -> std::result::Result<f32, String> {
        Ok(f32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-scale, scale).
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Two-pass mean and unbiased std of one column, in f64.
    fn two_pass(all: &[f32], n: usize, dim: usize, j: usize) -> (f64, f64) {
        let column: Vec<f64> = (0..n).map(|i| all[i * dim + j] as f64).collect();
        let mean = column.iter().sum::<f64>() / n as f64;
        let var = column.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (mean, var.sqrt())
    }

    #[test]
    fn streaming_matches_two_pass_over_uneven_batches() {
        let dim = 7;
        let sizes = [3, 1, 5, 2];
        let n: usize = sizes.iter().sum();
        let a = values(n * dim, 1, 100.0);
        let b: Vec<f32> = values(n * dim, 2, 1.0).iter().map(|x| x + 1e4).collect();
        let mut acc = StatisticsAccumulator::new(2, dim);
        let mut start = 0;
        for size in sizes {
            let range = start * dim..(start + size) * dim;
            acc.update_host(&[(size, &a[range.clone()]), (size, &b[range])])
                .unwrap();
            start += size;
        }
        let stats = acc
            .finish(vec!["a".into(), "b".into()], vec!["x".into(), "y".into()])
            .unwrap();
        assert_eq!(stats.count, n as u64);
        for (t, data) in [&a, &b].into_iter().enumerate() {
            for j in 0..dim {
                let (mean, std) = two_pass(data, n, dim, j);
                assert!((stats.mean[t][j] as f64 - mean).abs() <= 1e-6 * mean.abs().max(1.0));
                assert!(
                    (stats.std[t][j] as f64 - std).abs() <= 1e-5 * std,
                    "{t} {j}"
                );
            }
        }
    }

    #[test]
    fn zero_std_becomes_1e_3_and_one_input_is_an_error() {
        let mut acc = StatisticsAccumulator::new(1, 2);
        acc.update_host(&[(3, &[1.0, 5.0, 1.0, 6.0, 1.0, 7.0])])
            .unwrap();
        let stats = acc.finish(vec!["t".into()], vec!["s".into()]).unwrap();
        assert_eq!(stats.std[0][0], ZERO_STD_REPLACEMENT);
        assert_eq!(stats.std[0][1], 1.0);
        assert_eq!(stats.mean[0], vec![1.0, 6.0]);

        let mut acc = StatisticsAccumulator::new(1, 2);
        acc.update_host(&[(1, &[1.0, 5.0])]).unwrap();
        assert!(acc.finish(vec!["t".into()], vec!["s".into()]).is_err());
    }

    fn sample() -> TeacherStatistics {
        TeacherStatistics {
            teachers: vec!["tiny_resnet".into(), "tiny_vgg".into()],
            teacher_sha256: vec!["ab".repeat(32), "cd".repeat(32)],
            count: 42,
            mean: vec![values(1000, 3, 5.0), values(1000, 4, 0.1)],
            std: vec![values(1000, 5, 3.0), values(1000, 6, 1e-3)],
        }
    }

    #[test]
    fn save_and_load_are_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meanstd0.data");
        let stats = sample();
        stats.save(&path).unwrap();
        let loaded = TeacherStatistics::load(&path).unwrap();
        assert_eq!(loaded.teachers, stats.teachers);
        assert_eq!(loaded.teacher_sha256, stats.teacher_sha256);
        for (a, b) in stats
            .mean
            .iter()
            .chain(&stats.std)
            .zip(loaded.mean.iter().chain(&loaded.std))
        {
            let a: Vec<u32> = a.iter().map(|x| x.to_bits()).collect();
            let b: Vec<u32> = b.iter().map(|x| x.to_bits()).collect();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn corrupt_truncated_and_foreign_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.data");
        sample().save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();

        let mut flipped = good.clone();
        flipped[100] ^= 0x10;
        std::fs::write(&path, &flipped).unwrap();
        let err = TeacherStatistics::load(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("s.data"), "{err}");

        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(TeacherStatistics::load(&path).is_err());

        std::fs::write(&path, b"hello, this is not a statistics file at all......").unwrap();
        let err = TeacherStatistics::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a teacher statistics file"), "{err}");
    }

    #[test]
    fn z_scores_subtract_mean_and_divide_by_std() {
        let device = Device::flex();
        let stats = TeacherStatistics {
            teachers: vec!["t".into()],
            teacher_sha256: vec!["s".into()],
            count: 2,
            mean: vec![vec![1.0, -2.0, 0.0]],
            std: vec![vec![2.0, 0.5, 1e-3]],
        };
        let out = Tensor::<2>::from_floats([[3.0, -2.0, 1e-3], [1.0, 0.0, -2e-3]], &device);
        let z = stats.z_scores(&[out]).unwrap();
        let got = z[0].clone().into_data().try_into_vec::<f32>().unwrap();
        let want = [1.0, 0.0, 1.0, 0.0, 4.0, -2.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        assert!(stats.z_scores(&[]).is_err());
    }
}
