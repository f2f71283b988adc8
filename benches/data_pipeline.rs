//! Images per second of the MVTec input pipeline on this machine: PNG decode, conversion to
//! [-1, 1], resize to 1024x1024 (torchvision-exact), and the 25-patch full cut. Decoding runs in
//! parallel over images. Run with `cargo bench --bench data_pipeline`.

use std::time::Instant;

use multi_teacher_ad::data::{crops::FullCut, folder::load_images};

fn write_pngs(dir: &std::path::Path, side: u32, count: usize) -> Vec<std::path::PathBuf> {
    (0..count)
        .map(|i| {
            // Smooth structure plus noise: compresses like a photograph, not like a flat image.
            let image = image::RgbImage::from_fn(side, side, |x, y| {
                let n = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ i as u32) % 23;
                let v = ((x / 7 + y / 5) % 200) as u8;
                image::Rgb([v.wrapping_add(n as u8), v / 2 + n as u8, 255 - v])
            });
            let path = dir.join(format!("{side}_{i}.png"));
            image.save(&path).unwrap();
            path
        })
        .collect()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let threads = rayon::current_num_threads();
    println!("data pipeline on {threads} threads");
    let cut = FullCut::default();
    for (side, count) in [(700u32, 32usize), (1024, 32)] {
        let paths = write_pngs(dir.path(), side, count);
        // Warm-up: file cache and thread pool.
        load_images(&paths[..2], 1024).unwrap();
        // Best of three rounds: the figure a quiet machine gives.
        let (mut decoded, mut total) = (f64::MAX, f64::MAX);
        let mut patches = 0;
        for _ in 0..3 {
            let started = Instant::now();
            let images = load_images(&paths, 1024).unwrap();
            decoded = decoded.min(started.elapsed().as_secs_f64());
            patches = 0;
            for image in &images {
                assert_eq!(image.shape(), [3, 1024, 1024]);
                patches += cut.patches(image).unwrap().len();
            }
            total = total.min(started.elapsed().as_secs_f64());
        }
        assert_eq!(patches, 25 * count);
        println!(
            "{side}x{side} PNG -> 1024x1024 -> 25 patches: {:.1} images/s \
             ({:.1} images/s without the cut)",
            count as f64 / total,
            count as f64 / decoded
        );
    }
}
