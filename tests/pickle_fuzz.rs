//! The pickle reader and the CIFAR batch checks never panic or hang on mutated real-format
//! pickles, nor on random opcode streams: every case ends in a value or an error, quickly.
//!
//! `PROPTEST_CASES` sets the number of cases of each property (default 2000, a few seconds).

use std::time::{Duration, Instant};

use proptest::prelude::*;

use multi_teacher_ad::data::{cifar, pickle};

/// Seeds: a Python 2 CIFAR batch, its metadata, the shared-memo arrays and the Python 3
/// re-pickles (protocols 2 to 5), so that every opcode they use gets mutated.
const SEEDS: [&str; 7] = [
    "cifar-10-batches-py/data_batch_1",
    "cifar-10-batches-py/batches.meta",
    "shared_memo.pkl",
    "python3/protocol_2.pkl",
    "python3/protocol_3.pkl",
    "python3/protocol_4.pkl",
    "python3/protocol_5.pkl",
];

/// Each case is bounded: the largest input here reads in well under a millisecond.
const CASE_LIMIT: Duration = Duration::from_secs(2);

fn seed(i: usize) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cifar/");
    std::fs::read(format!("{path}{}", SEEDS[i])).unwrap()
}

/// Where a mutation lands: anywhere, or (more often than chance) in the opcodes that surround
/// the pixel data, near the start and the end.
#[derive(Debug, Clone)]
enum Position {
    Anywhere(usize),
    Head(usize),
    Tail(usize),
}

impl Position {
    fn resolve(&self, len: usize) -> usize {
        match *self {
            Position::Anywhere(i) => i % (len + 1),
            Position::Head(i) => i.min(len),
            Position::Tail(i) => len.saturating_sub(i),
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: Position,
        bits: u8,
    },
    Set {
        at: Position,
        byte: u8,
    },
    Truncate {
        at: Position,
    },
    Insert {
        at: Position,
        bytes: Vec<u8>,
    },
    Remove {
        at: Position,
        len: usize,
    },
    Duplicate {
        from: Position,
        len: usize,
        to: Position,
    },
}

fn position() -> impl Strategy<Value = Position> {
    prop_oneof![
        any::<usize>().prop_map(Position::Anywhere),
        (0usize..400).prop_map(Position::Head),
        (0usize..200).prop_map(Position::Tail),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (position(), 1u8..=255).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        (position(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        position().prop_map(|at| Mutation::Truncate { at }),
        (position(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (position(), 1usize..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (position(), 1usize..256, position()).prop_map(|(from, len, to)| Mutation::Duplicate {
            from,
            len,
            to
        }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    let index = |p: &Position| p.resolve(len).min(len.saturating_sub(1));
    match m {
        Mutation::Flip { at, bits } if len > 0 => bytes[index(at)] ^= bits,
        Mutation::Set { at, byte } if len > 0 => bytes[index(at)] = *byte,
        Mutation::Truncate { at } => bytes.truncate(at.resolve(len)),
        Mutation::Insert { at, bytes: new } => {
            let i = at.resolve(len);
            bytes.splice(i..i, new.iter().copied());
        }
        Mutation::Remove { at, len: n } => {
            let i = at.resolve(len);
            bytes.drain(i..(i + n).min(len));
        }
        Mutation::Duplicate { from, len: n, to } => {
            let start = from.resolve(len);
            let span = bytes[start..(start + n).min(len)].to_vec();
            let i = to.resolve(len);
            bytes.splice(i..i, span);
        }
        _ => {}
    }
}

/// Reads `bytes` as a pickle, then as a CIFAR batch from a file: never a panic.
fn read_everything(bytes: &[u8], file: &std::path::Path) {
    if let Ok(value) = pickle::read(bytes) {
        if let Some(data) = value.get("data") {
            let _ = pickle::numpy_array(data);
        }
        if let pickle::Value::List(items) = &value {
            for item in items {
                let _ = pickle::numpy_array(item);
            }
        }
    }
    std::fs::write(file, bytes).unwrap();
    let _ = cifar::read_python_batch(file);
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Opcodes of protocols 0-5, with the bytes their arguments take when small.
fn opcode() -> impl Strategy<Value = Vec<u8>> {
    let simple = prop::sample::select(
        b"(.0129NR]abdehlqrsjtu}\x81\x85\x86\x87\x88\x89\x93\x94)cKMJUCTBGIFLX\x8a\x8b\x8c\x8d\x8e\x95\x96\x80"
            .to_vec(),
    );
    prop_oneof![
        4 => simple.prop_map(|op| vec![op]),
        // an opcode with a short argument
        2 => (prop::sample::select(b"KqhUC\x8c\x8a\x80".to_vec()), 0u8..8)
            .prop_map(|(op, arg)| vec![op, arg]),
        1 => (prop::sample::select(b"XTBJrj".to_vec()), 0u8..8)
            .prop_map(|(op, arg)| vec![op, arg, 0, 0, 0]),
        1 => Just(b"cnumpy\ndtype\n".to_vec()),
        1 => Just(b"c_codecs\nencode\n".to_vec()),
        1 => Just(b"X\x06\x00\x00\x00latin1".to_vec()),
        1 => Just(b"I01\n".to_vec()),
        1 => prop::collection::vec(any::<u8>(), 1..4),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_pickles_never_panic(
        which in 0..SEEDS.len(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut bytes = seed(which);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        read_everything(&bytes, &dir.path().join("data_batch_1"));
        prop_assert!(started.elapsed() < CASE_LIMIT, "took {:?}", started.elapsed());
    }

    #[test]
    fn random_opcode_streams_never_panic(ops in prop::collection::vec(opcode(), 0..120)) {
        let mut bytes = b"\x80\x02".to_vec();
        bytes.extend(ops.concat());
        bytes.push(b'.');
        let started = Instant::now();
        if let Ok(value) = pickle::read(&bytes) {
            let _ = pickle::numpy_array(&value);
            let _ = value.get("data");
        }
        prop_assert!(started.elapsed() < CASE_LIMIT, "took {:?}", started.elapsed());
    }
}

#[test]
fn the_unmutated_seeds_read() {
    let value = pickle::read(&seed(0)).unwrap();
    let array = pickle::numpy_array(value.get("data").unwrap()).unwrap();
    assert_eq!(array.shape, vec![3, 3072]);
    assert_eq!(array.dtype, "|u1");
    for (i, name) in SEEDS.iter().enumerate().skip(1) {
        assert!(pickle::read(&seed(i)).is_ok(), "{name}");
    }
}

#[test]
fn mutations_do_change_the_input() {
    // The fuzzer exercises something: a flip in the header makes the batch unreadable.
    let mut bytes = seed(0);
    apply(
        &mut bytes,
        &Mutation::Set {
            at: Position::Head(1),
            byte: 9,
        },
    );
    assert!(pickle::read(&bytes).is_err());
}
