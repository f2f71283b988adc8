//! The pickle reader never panics or hangs on mutated real-format CIFAR batches.
//! `PROPTEST_CASES` sets the number of cases (default 2000 here).

use proptest::prelude::*;

use multi_teacher_ad::data::pickle;

fn fixture() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cifar/cifar-10-batches-py/data_batch_1"
    ))
    .unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bits: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Duplicate { at: usize, len: usize, to: usize },
    Set { at: usize, byte: u8 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..64, any::<usize>())
            .prop_map(|(at, len, to)| Mutation::Duplicate { at, len, to }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Flip { at, bits } => {
            let i = at % bytes.len();
            bytes[i] ^= bits;
        }
        Mutation::Truncate { at } => bytes.truncate(at % bytes.len()),
        Mutation::Insert { at, bytes: new } => {
            let i = at % (bytes.len() + 1);
            bytes.splice(i..i, new.iter().copied());
        }
        Mutation::Duplicate { at, len, to } => {
            let start = at % bytes.len();
            let end = (start + len).min(bytes.len());
            let span: Vec<u8> = bytes[start..end].to_vec();
            let i = to % (bytes.len() + 1);
            bytes.splice(i..i, span);
        }
        Mutation::Set { at, byte } => {
            let i = at % bytes.len();
            bytes[i] = *byte;
        }
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_batches_never_panic(mutations in prop::collection::vec(mutation(), 1..6)) {
        let mut bytes = fixture();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let started = std::time::Instant::now();
        // Either a value or an error: never a panic.
        if let Ok(value) = pickle::read(&bytes) {
            if let Some(data) = value.get("data") {
                let _ = pickle::numpy_array(data);
            }
        }
        prop_assert!(started.elapsed().as_secs() < 2, "took {:?}", started.elapsed());
    }
}

#[test]
fn the_unmutated_fixture_reads() {
    let value = pickle::read(&fixture()).unwrap();
    let array = pickle::numpy_array(value.get("data").unwrap()).unwrap();
    assert_eq!(array.shape, vec![3, 3072]);
    assert_eq!(array.dtype, "|u1");
}
