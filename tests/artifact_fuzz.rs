//! The model artifact's reader (`model.mtad`) never panics, hangs or allocates without bound on
//! damaged files: bytes flipped or cut anywhere (the checksums must catch them), and headers
//! rewritten with hostile values whose checksum was recomputed (a consistent file written by
//! someone else), which must then load and score an image or fail with an error.
//!
//! `PROPTEST_CASES` sets the number of cases of each property (defaults below, a few seconds).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::prelude::*;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use common::{demo_data, request, run};
use multi_teacher_ad::inference::detect::{Detector, Heatmaps, ScoreColumn, ThresholdChoice};
use multi_teacher_ad::output::artifact::Artifact;
use multi_teacher_ad::teachers::WeightsLocation;

/// A real artifact (a tiny run of one epoch), a test image, and the folder they live in.
fn seed() -> &'static (Vec<u8>, PathBuf, tempfile::TempDir) {
    static SEED: OnceLock<(Vec<u8>, PathBuf, tempfile::TempDir)> = OnceLock::new();
    SEED.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let data = demo_data(tmp.path());
        let mut r = request(&data, &tmp.path().join("run"), &tmp.path().join("cache"));
        r.settings.epochs = 1;
        r.settings.student = multi_teacher_ad::students::StudentKind::Resnet;
        run(r);
        let bytes = std::fs::read(tmp.path().join("run/weave/model.mtad")).unwrap();
        let image = data.join("weave/test/good/000.png");
        (bytes, image, tmp)
    })
}

/// Where the header's JSON lies in the file: magic (11), version (4), length (8), JSON.
fn header_span(bytes: &[u8]) -> (usize, usize) {
    let length = u64::from_le_bytes(bytes[15..23].try_into().unwrap()) as usize;
    (23, 23 + length)
}

fn write_case(bytes: &[u8]) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = seed().2.path().join(format!("case-{n}.mtad"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Reads, loads and scores with the file at `path`; any outcome but a panic is fine.
fn use_model(path: &Path, full: bool) {
    let _ = Artifact::read_header(path);
    if !full {
        return;
    }
    if let Ok(mut detector) = Detector::from_artifact(
        path,
        ScoreColumn::Nor,
        ThresholdChoice {
            threshold: None,
            fpr: Some(0.05),
        },
        &WeightsLocation::Build,
        Device::flex(),
    ) {
        detector.masks = true;
        let _ = detector.score(&seed().1, Heatmaps::Scores, Some(seed().2.path()));
    }
    let _ = std::fs::remove_file(path);
}

/// A hostile replacement for a JSON value.
fn hostile() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1e308)),
        Just(json!(-1e308)),
        Just(json!(u64::MAX)),
        Just(json!(4_000_000_000u64)),
        Just(json!("")),
        Just(json!("../../etc/passwd")),
        Just(json!([])),
        Just(json!([1e308, -1e308])),
        Just(json!({})),
        Just(json!(null)),
        Just(json!(true)),
    ]
}

/// The leaves of a JSON value, as paths of keys and indices.
fn leaves(value: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                path.push(k.clone());
                leaves(v, path, out);
                path.pop();
            }
        }
        // Long arrays: a few of their elements (and the array itself) only.
        serde_json::Value::Array(items) => {
            out.push(path.clone());
            for i in [0, items.len() / 2, items.len().saturating_sub(1)] {
                if let Some(v) = items.get(i) {
                    path.push(i.to_string());
                    leaves(v, path, out);
                    path.pop();
                }
            }
        }
        _ => out.push(path.clone()),
    }
}

fn at<'a>(value: &'a mut serde_json::Value, path: &[String]) -> &'a mut serde_json::Value {
    path.iter().fold(value, |v, key| match v {
        serde_json::Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
        other => &mut other[key.as_str()],
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
    ))]

    /// Bytes flipped in the header, or the file cut anywhere: an error, quickly.
    #[test]
    fn flipped_or_cut_files_are_errors(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (bytes, _, _) = seed();
        let (_, end) = header_span(bytes);
        let mut case = bytes.clone();
        for (index, xor) in flips {
            // Mostly in the header region, where the reader parses.
            let i = index.index(end + 64);
            case[i] ^= xor;
        }
        if let Some(cut) = cut {
            case.truncate(cut.index(case.len()));
        }
        let started = std::time::Instant::now();
        let path = write_case(&case);
        prop_assert!(Artifact::read_header(&path).is_err() || case.len() == bytes.len());
        prop_assert!(Artifact::read(&path).is_err());
        let _ = std::fs::remove_file(path);
        prop_assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(40)
    ))]

    /// A header value replaced by a hostile one, the checksum recomputed: the file is read,
    /// loaded and used to score an image, or refused with an error; never a panic.
    #[test]
    fn consistent_files_with_hostile_headers_never_panic(
        pick in any::<prop::sample::Index>(),
        replacement in hostile(),
    ) {
        let (bytes, _, _) = seed();
        let (start, end) = header_span(bytes);
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[start..end]).unwrap();
        let mut paths = Vec::new();
        leaves(&header, &mut Vec::new(), &mut paths);
        let path = &paths[pick.index(paths.len())];
        *at(&mut header, path) = replacement.clone();
        let json = serde_json::to_vec(&header).unwrap();
        let mut case = bytes[..15].to_vec();
        case.extend((json.len() as u64).to_le_bytes());
        case.extend(&json);
        case.extend(Sha256::digest(&json));
        case.extend(&bytes[end + 32..]);
        let file = write_case(&case);
        let outcome = std::panic::catch_unwind(|| use_model(&file, true));
        prop_assert!(outcome.is_ok(), "a panic with {replacement} at {}", path.join("."));
    }
}
