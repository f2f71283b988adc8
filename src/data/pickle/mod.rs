//! A small, bounded reader of Python pickles (binary opcodes of protocols 1-5, plus the few text
//! ones a protocol-2 file may hold), enough for the CIFAR-10 python batches: Python 2 cPickle
//! protocol-2 files holding a dict with a numpy `uint8` array (`numpy.core.multiarray._reconstruct`
//! + `numpy.dtype` + `BUILD`) and lists, and the same data re-pickled by Python 3 (protocols 2-5).
//!
//! It never executes anything: `GLOBAL`, `REDUCE`, `NEWOBJ` and `BUILD` only record what they
//! name. The exceptions are the two calls Python 3 writes for plain byte strings in protocol 2,
//! `_codecs.encode(text, "latin1")` and `builtins.bytes()`, which are decoded to bytes.
//!
//! The machine works like Python's: objects live in an arena and the stack and memo hold
//! references, so `APPEND`, `SETITEM` or `BUILD` after a `BINPUT` change the one shared object,
//! exactly as a later `BINGET` must see it. The finished object graph is then turned into a
//! [`Value`] tree that keeps that sharing (`Rc`), so repeated references cost nothing.
//!
//! Every input is bounded: each opcode creates at most one object and moves at most the items it
//! consumed, so memory and time grow linearly with the input and never exceed [`MAX_VALUES`]
//! objects and references; values nest at most [`MAX_DEPTH`] deep, and a value that contains
//! itself is an error. Malformed input gives an error with its byte offset, never a panic, a hang
//! or an allocation storm.

mod machine;
mod numpy;
mod tree;

use std::{collections::HashMap, rc::Rc};

use machine::Machine;
pub use numpy::{NumpyArray, numpy_array};
use tree::TreeBuilder;

/// Most objects, stack entries, memo entries and container items one pickle may create: about
/// 100 times what a CIFAR-10 batch needs (10000 labels and 10000 file names).
pub const MAX_VALUES: usize = 1 << 21;

/// Deepest nesting of containers and objects (a CIFAR-10 batch nests 6 deep).
pub const MAX_DEPTH: usize = 100;

/// A decoded pickle value. Objects the pickle shares (memo references) are shared `Rc`s here.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Python 2 `str` or Python 3 `bytes` / `bytearray`.
    Bytes(Vec<u8>),
    /// Python `unicode` / `str`.
    Str(String),
    List(Vec<Rc<Value>>),
    Tuple(Vec<Rc<Value>>),
    /// Items in the order they were set, repeated keys included; [`Value::get`] finds the last.
    Dict(Vec<(Rc<Value>, Rc<Value>)>),
    /// `module.name` named by `GLOBAL` / `STACK_GLOBAL`.
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)` recorded by `REDUCE` / `NEWOBJ`, with the state `BUILD` gave it.
    Object {
        callable: Rc<Value>,
        args: Rc<Value>,
        state: Option<Rc<Value>>,
    },
}

impl Value {
    /// Text of a `Str`, or of `Bytes` that are UTF-8 (Python 2 `str`).
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            Value::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value stored under the text key `key`, if this is a dict. As in Python, a key set
    /// twice holds the value set last.
    pub fn get(&self, key: &str) -> Option<&Rc<Value>> {
        match self {
            Value::Dict(items) => items
                .iter()
                .rev()
                .find(|(k, _)| k.as_text() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short name of the value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Bytes(_) => "bytes",
            Value::Str(_) => "str",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Global { .. } => "global",
            Value::Object { .. } => "object",
        }
    }
}

/// Why a pickle could not be read, with the byte offset of the opcode at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    pub offset: usize,
    pub message: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pickle byte {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for PickleError {}

/// Reads one pickle from `input` and returns its value. Bytes after `STOP` are ignored, as
/// Python does.
pub fn read(input: &[u8]) -> Result<Value, PickleError> {
    let mut machine = Machine {
        input,
        pos: 0,
        op_start: 0,
        objects: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        references: 0,
    };
    let root = machine.run()?;
    let stop = machine.op_start;
    let mut builder = TreeBuilder {
        machine: &machine,
        done: vec![None; machine.objects.len()],
        in_progress: vec![false; machine.objects.len()],
        stop,
    };
    let value = builder.build(root, 0)?;
    drop(builder);
    Ok(Rc::try_unwrap(value).unwrap_or_else(|shared| (*shared).clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle of {"a": [1, 300, -2], b"k": (None, True, 1.5, u"\u00e9")}.
    fn small() -> Vec<u8> {
        let mut p = b"\x80\x02}q\x00(".to_vec();
        p.extend_from_slice(b"U\x01aq\x01]q\x02(K\x01M\x2c\x01J\xfe\xff\xff\xffe");
        p.extend_from_slice(b"U\x01k(N\x88G\x3f\xf8\x00\x00\x00\x00\x00\x00");
        p.extend_from_slice(b"X\x02\x00\x00\x00\xc3\xa9tu.");
        p
    }

    fn ints(values: &[i64]) -> Value {
        Value::List(values.iter().map(|&v| Rc::new(Value::Int(v))).collect())
    }

    #[test]
    fn reads_dicts_lists_ints_floats_and_strings() {
        let value = read(&small()).unwrap();
        assert_eq!(**value.get("a").unwrap(), ints(&[1, 300, -2]));
        let Value::Tuple(t) = &**value.get("k").unwrap() else {
            panic!("not a tuple")
        };
        assert_eq!(*t[0], Value::None);
        assert_eq!(*t[1], Value::Bool(true));
        assert_eq!(*t[2], Value::Float(1.5));
        assert_eq!(t[3].as_text(), Some("é"));
    }

    #[test]
    fn long_integers_are_twos_complement() {
        // LONG1 of 0 bytes, 255 (needs a sign byte), -1, -256, 2^40; LONG4 of -2.
        let p = b"\x80\x02(\x8a\x00\x8a\x02\xff\x00\x8a\x01\xff\x8a\x02\x00\xff\
                  \x8a\x06\x00\x00\x00\x00\x00\x01\x8b\x01\x00\x00\x00\xfel.";
        assert_eq!(read(p).unwrap(), ints(&[0, 255, -1, -256, 1 << 40, -2]));
        let err = read(b"\x80\x02\x8a\x09\x01\x02\x03\x04\x05\x06\x07\x08\x09.").unwrap_err();
        assert!(err.message.contains("too large"), "{err}");
    }

    #[test]
    fn memo_get_returns_what_was_put() {
        // [b"x", <memo 1>] with BINPUT / BINGET
        let value = read(b"\x80\x02]q\x00(U\x01xq\x01h\x01e.").unwrap();
        let Value::List(items) = value else { panic!() };
        assert_eq!(items.len(), 2);
        assert!(Rc::ptr_eq(&items[0], &items[1]));
        let err = read(b"\x80\x02h\x05.").unwrap_err();
        assert!(err.message.contains("never stored"), "{err}");
    }

    #[test]
    fn changes_after_a_memo_put_are_seen_through_the_memo() {
        // l = []; memo 1 = l; l.append(7); [l, <memo 1>] -> both are [7], as in Python.
        let value = read(b"\x80\x02](]q\x01K\x07ah\x01e.").unwrap();
        assert_eq!(
            value,
            Value::List(vec![Rc::new(ints(&[7])), Rc::new(ints(&[7]))])
        );
        // The same for BUILD: the state reaches the object a later BINGET returns.
        let p = b"\x80\x02(cm\nf\n)Rq\x01K\x05bh\x01t.";
        let Value::Tuple(items) = read(p).unwrap() else {
            panic!()
        };
        for item in &items {
            let Value::Object { state, .. } = &**item else {
                panic!()
            };
            assert_eq!(state.as_deref(), Some(&Value::Int(5)));
        }
    }

    #[test]
    fn a_key_set_twice_holds_the_last_value() {
        let value = read(b"\x80\x02}(U\x01aK\x01U\x01aK\x02u.").unwrap();
        assert_eq!(**value.get("a").unwrap(), Value::Int(2));
    }

    #[test]
    fn errors_say_where() {
        assert!(read(b"").unwrap_err().message.contains("no STOP"));
        let err = read(b"\x80\x02T\xff\xff\x00\x00ab").unwrap_err();
        assert!(err.message.contains("truncated"), "{err}");
        assert_eq!(err.offset, 2);
        let err = read(b"\x80\x02\xff.").unwrap_err();
        assert!(err.message.contains("unsupported opcode 0xff"), "{err}");
        assert_eq!(err.offset, 2);
        assert!(read(b"a.").is_err());
        assert!(read(b"NN.").unwrap_err().message.contains("expected one"));
        assert!(read(b"(N.").unwrap_err().message.contains("1 marks"));
        let err = read(b"\x80\x09N.").unwrap_err();
        assert!(err.message.contains("protocol"), "{err}");
        let err = read(b"\x80\x02K\x01K\x02s.").unwrap_err();
        assert!(err.message.contains("stack underflow"), "{err}");
        let err = read(b"\x80\x02(K\x01\x86.").unwrap_err();
        assert!(err.message.contains("TUPLE2"), "{err}");
    }

    #[test]
    fn pop_at_a_mark_discards_the_mark_as_python_does() {
        assert_eq!(read(b"\x80\x02K\x01(0.").unwrap(), Value::Int(1));
        assert_eq!(read(b"\x80\x02K\x01K\x020.").unwrap(), Value::Int(1));
    }

    #[test]
    fn python3_byte_strings_are_decoded() {
        // _codecs.encode(u"\xff\x01", "latin1"), as Python 3 writes bytes in protocol 2
        let p =
            b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00\xc3\xbf\x01X\x06\x00\x00\x00latin1\x86R.";
        assert_eq!(read(p).unwrap(), Value::Bytes(vec![0xff, 0x01]));
        // bytes() for the empty byte string
        assert_eq!(
            read(b"\x80\x02c__builtin__\nbytes\n)R.").unwrap(),
            Value::Bytes(vec![])
        );
        let p = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00\xc4\x80U\x06latin1\x86R.";
        assert!(read(p).unwrap_err().message.contains("not latin-1"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // ((((...)))) a million deep: 1 MB of TUPLE1.
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85, 1_000_000));
        p.push(b'.');
        let err = read(&p).unwrap_err();
        assert!(err.message.contains("nested more than"), "{err}");
        // Within the limit it reads.
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85, MAX_DEPTH - 1));
        p.push(b'.');
        assert!(read(&p).is_ok());
    }

    #[test]
    fn a_value_containing_itself_is_an_error() {
        // l = []; l.append(l)
        let err = read(b"\x80\x02]q\x00h\x00a.").unwrap_err();
        assert!(err.message.contains("contains itself"), "{err}");
    }

    #[test]
    fn shared_values_are_built_once() {
        // x0 = []; x_{i+1} = (x_i, x_i): 2^60 leaves as a tree, 60 objects as a graph.
        let mut p = b"\x80\x02]q\x000".to_vec();
        for _ in 0..60 {
            p.extend_from_slice(b"h\x00h\x00\x86q\x000");
        }
        p.extend_from_slice(b"h\x00.");
        let started = std::time::Instant::now();
        let Value::Tuple(items) = read(&p).unwrap() else {
            panic!()
        };
        assert!(Rc::ptr_eq(&items[0], &items[1]));
        assert!(started.elapsed().as_secs() < 1);
    }

    #[test]
    fn the_number_of_objects_is_bounded() {
        // MAX_VALUES + 1 Nones, appended to a list in batches.
        let mut p = b"\x80\x02]".to_vec();
        for _ in 0..=MAX_VALUES / 1000 {
            p.push(b'(');
            p.extend(std::iter::repeat_n(b'N', 1000));
            p.push(b'e');
        }
        p.push(b'.');
        let err = read(&p).unwrap_err();
        assert!(err.message.contains("too large"), "{err}");
        // DUP needs no new objects but is bounded all the same.
        let mut p = b"\x80\x02N".to_vec();
        p.extend(std::iter::repeat_n(b'2', MAX_VALUES + 1));
        assert!(read(&p).unwrap_err().message.contains("stack deeper"));
    }

    #[test]
    fn numpy_arrays_are_checked() {
        // _reconstruct(ndarray, (0,), b"b") with state (1, (2, 2), dtype("u1"), False, 4 bytes)
        let array = |shape: &[u8], dtype: &[u8], data: &[u8]| {
            let mut p = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\
                          K\x00\x85U\x01b\x87R(K\x01"
                .to_vec();
            p.extend_from_slice(shape);
            p.extend_from_slice(b"cnumpy\ndtype\n");
            p.extend_from_slice(dtype);
            p.extend_from_slice(
                b"K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U",
            );
            p.push(data.len() as u8);
            p.extend_from_slice(data);
            p.extend_from_slice(b"tb.");
            read(&p).unwrap()
        };
        let good = array(b"K\x02K\x02\x86", b"U\x02u1", &[1, 2, 3, 4]);
        let a = numpy_array(&good).unwrap();
        assert_eq!((a.shape.as_slice(), a.dtype.as_str()), (&[2, 2][..], "|u1"));
        assert_eq!(a.data, &[1, 2, 3, 4]);
        let short = array(b"K\x02K\x02\x86", b"U\x02u1", &[1, 2, 3]);
        let err = numpy_array(&short).unwrap_err();
        assert!(err.contains("needs 4 bytes, holds 3"), "{err}");
        let wide = array(b"K\x02K\x01\x86", b"U\x02f2", &[1, 2, 3, 4]);
        assert_eq!(numpy_array(&wide).unwrap().dtype, "|f2");
        let object = array(b"K\x01\x85", b"U\x02O8", &[0; 8]);
        assert!(
            numpy_array(&object)
                .unwrap_err()
                .contains("unsupported numpy dtype")
        );
        let huge = array(
            b"J\xff\xff\xff\x7fJ\xff\xff\xff\x7fJ\xff\xff\xff\x7f\x87",
            b"U\x02u1",
            &[],
        );
        assert!(numpy_array(&huge).is_err());
        assert!(
            numpy_array(&Value::Int(3))
                .unwrap_err()
                .contains("found a int")
        );
    }
}
