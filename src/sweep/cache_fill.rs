//! `mtad cache build`: fills the teacher-embedding cache of a dataset's classes once, before the
//! jobs that share it start (they would otherwise wait for whichever of them builds an entry
//! first: see `training::cache`).

use std::path::PathBuf;

use crate::output::lock::host_name;
use crate::training::prepare::{DataSet, TrainRequest, prepare};
use crate::{Error, Result};

/// What was filled.
#[derive(Debug, Clone)]
pub struct Filled {
    pub cache_dir: PathBuf,
    pub classes: Vec<String>,
    /// Inputs that went through the teachers (0: everything was there already).
    pub teacher_inputs: u64,
}

/// Fills the caches `request` would use (its `out` is ignored: a scratch folder in the cache
/// folder is used and removed). The no-teacher ablation has nothing to cache.
pub fn fill(mut request: TrainRequest) -> Result<Filled> {
    let cache_dir = request.settings.cache_dir.clone();
    let scratch = cache_dir.join(format!(".fill-{}-{}", host_name(), std::process::id()));
    request.out = scratch.clone();
    request.cover = true;
    request.resume = false;
    let result = (|| {
        let prepared = prepare(request)?;
        let classes: Vec<String> = prepared
            .config
            .class_indices
            .iter()
            .map(|&c| prepared.config.class_names[c].clone())
            .collect();
        let Some(runner) = prepared.runner.clone() else {
            return Err(Error::InvalidArgument(
                "--teachers none: there is no teacher output to cache".into(),
            ));
        };
        let before = runner
            .inputs_forwarded
            .load(std::sync::atomic::Ordering::Relaxed);
        match &prepared.data {
            DataSet::Cifar(cifar) => {
                prepared.cifar_caches(cifar, &runner)?;
            }
            DataSet::Folder(categories) => {
                for (position, &class) in prepared.config.class_indices.iter().enumerate() {
                    tracing::info!(
                        "cache of class {} ({}/{})",
                        prepared.config.class_names[class],
                        position + 1,
                        classes.len()
                    );
                    prepared.folder_class(class, &categories[position])?;
                }
            }
        }
        let after = runner
            .inputs_forwarded
            .load(std::sync::atomic::Ordering::Relaxed);
        Ok(Filled {
            cache_dir: cache_dir.clone(),
            classes,
            teacher_inputs: after - before,
        })
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}
