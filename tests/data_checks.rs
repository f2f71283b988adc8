//! `inspect` and `train` apply the same checks: data that `inspect` calls usable is what
//! `train` accepts, and `train` checks every class's files (decoding each image) before its
//! first class starts.

mod common;

use std::path::Path;

use common::{demo_data, request};
use multi_teacher_ad::data::inspect::{InspectReport, inspect_folder};
use multi_teacher_ad::training::prepare::prepare;

/// The verdicts of both on `data` for the classes `disc,grain,weave`: inspect's problems, and
/// train's error (`None` if it accepts the data).
fn verdicts(data: &Path, out: &Path) -> (InspectReport, Option<String>) {
    let report = inspect_folder(data, false);
    let mut r = request(data, out, &out.with_extension("cache"));
    r.settings.classes = "disc,grain,weave".into();
    let train = prepare(r).err().map(|e| e.to_string());
    (report, train)
}

/// A PNG of `side` pixels whose header claims `claimed` x `claimed` (the chunk's CRC fixed).
fn png_claiming(side: u32, claimed: u32) -> Vec<u8> {
    let image = image::RgbImage::from_pixel(side, side, image::Rgb([9, 9, 9]));
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(image)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    // IHDR: length (8..12), "IHDR" (12..16), width (16..20), height (20..24), ..., CRC (29..33).
    bytes[16..20].copy_from_slice(&claimed.to_be_bytes());
    bytes[20..24].copy_from_slice(&claimed.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn inspect_and_train_agree_on_each_kind_of_bad_data() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    // Clean data: both accept it.
    let data = demo_data(&tmp.path().join("clean"));
    let (report, train) = verdicts(&data, &out);
    assert!(report.is_usable(), "{report}");
    assert_eq!(train, None);
    std::fs::remove_dir_all(&out).unwrap();

    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 3] = [
        // A truncated image in the last class: found before the first class starts.
        (
            "truncated",
            |d| {
                let victim = d.join("weave/test/good/000.png");
                let bytes = std::fs::read(&victim).unwrap();
                std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
            },
            "weave/test/good/000.png",
        ),
        // One training image.
        (
            "one-image",
            |d| {
                for entry in std::fs::read_dir(d.join("grain/train/good")).unwrap() {
                    let path = entry.unwrap().path();
                    if !path.ends_with("000.png") {
                        std::fs::remove_file(path).unwrap();
                    }
                }
            },
            "1 training images; at least 2 are needed",
        ),
        // A header claiming 100000 x 100000 pixels: refused before anything is allocated.
        (
            "huge-header",
            |d| {
                let victim = d.join("grain/train/good/001.png");
                std::fs::write(victim, png_claiming(8, 100_000)).unwrap();
            },
            "grain/train/good/001.png",
        ),
    ];
    for (name, damage, expected) in cases {
        let data = demo_data(&tmp.path().join(name));
        damage(&data);
        let (report, train) = verdicts(&data, &out);
        let text = report.to_string();
        assert!(
            !report.is_usable(),
            "{name}: inspect calls it usable:\n{text}"
        );
        assert!(text.contains(expected), "{name}: {text}");
        let train = train.unwrap_or_else(|| panic!("{name}: train accepts what inspect refuses"));
        assert!(train.contains(expected), "{name}: {train}");
        assert!(
            !out.exists(),
            "{name}: nothing is written before the checks pass"
        );
    }
}
