//! `--batch-size`: its default per dataset and its bounds.

use super::MAX_BATCH_SIZE;
use crate::data::DatasetKind;

/// `--batch-size` when not given: 32 CIFAR-10 inputs, the reference's 4 MVTec/folder images.
pub fn default_batch_size(dataset: DatasetKind) -> usize {
    match dataset {
        DatasetKind::Cifar10 => 32,
        _ => crate::data::crops::MVTEC_IMAGES_PER_BATCH,
    }
}

/// `--batch-size` within bounds: at least 2 inputs per step (batch norm), at most
/// [`MAX_BATCH_SIZE`] images and, for crops, at most [`MAX_BATCH_SIZE`] inputs.
pub fn check_batch_size(
    batch: Option<usize>,
    crops: usize,
    dataset: DatasetKind,
) -> std::result::Result<(), String> {
    let images = batch.unwrap_or(default_batch_size(dataset));
    let inputs = match dataset {
        DatasetKind::Cifar10 => images,
        _ => images.saturating_mul(crops),
    };
    if images == 0 || images > MAX_BATCH_SIZE || inputs < 2 || inputs > MAX_BATCH_SIZE {
        let per = match dataset {
            DatasetKind::Cifar10 => String::new(),
            _ => format!(" ({images} images x {crops} crops = {inputs} inputs)"),
        };
        return Err(format!(
            "--batch-size {images}{per}: a step takes from 2 inputs (batch norm needs two) to \
             {MAX_BATCH_SIZE}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_takes_from_two_to_the_most_inputs() {
        let (mvtec, cifar) = (DatasetKind::Mvtec, DatasetKind::Cifar10);
        assert_eq!(default_batch_size(mvtec), 4);
        assert_eq!(default_batch_size(cifar), 32);
        assert!(check_batch_size(None, 16, mvtec).is_ok());
        assert!(check_batch_size(Some(64), 16, mvtec).is_ok());
        let err = check_batch_size(Some(65), 16, mvtec).unwrap_err();
        assert!(err.contains("65 images x 16 crops = 1040 inputs"), "{err}");
        assert!(check_batch_size(Some(1), 1, mvtec).is_err());
        assert!(check_batch_size(Some(1), 2, mvtec).is_ok());
        assert!(check_batch_size(Some(1), 16, cifar).is_err());
        assert!(check_batch_size(Some(1024), 16, cifar).is_ok());
        assert!(check_batch_size(Some(0), 16, mvtec).is_err());
    }
}
