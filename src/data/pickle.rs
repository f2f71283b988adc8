//! A small, bounded reader of Python pickles (protocols 0-5, binary opcodes), enough for the
//! CIFAR-10 python batches: Python 2 cPickle protocol-2 files holding a dict with a numpy
//! `uint8` array (`numpy.core.multiarray._reconstruct` + `numpy.dtype` + `BUILD`) and lists.
//!
//! It never executes anything: `GLOBAL`, `REDUCE`, `NEWOBJ` and `BUILD` only record what they
//! name (the one exception is `_codecs.encode(str, "latin1")`, which Python 3 writes for byte
//! strings in protocol 2 and which is decoded to bytes). Every input is bounded: stack and memo
//! sizes by the input length, the work of copying shared containers by a budget proportional to
//! the input, so malformed input gives an error, never a panic, a hang or an allocation storm.

use std::{collections::HashMap, rc::Rc};

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Python 2 `str` or Python 3 `bytes`.
    Bytes(Vec<u8>),
    /// Python `unicode` / `str`.
    Str(String),
    List(Vec<Rc<Value>>),
    Tuple(Vec<Rc<Value>>),
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

    /// The value stored under the text key `key`, if this is a dict.
    pub fn get(&self, key: &str) -> Option<&Rc<Value>> {
        match self {
            Value::Dict(items) => items
                .iter()
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

/// Why a pickle could not be read, with the byte offset.
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

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    op_start: usize,
    stack: Vec<Rc<Value>>,
    marks: Vec<usize>,
    memo: HashMap<u32, Rc<Value>>,
    /// Element copies still allowed when a shared container must be copied to be modified.
    copy_budget: usize,
}

/// Reads one pickle from `input` and returns its value. Bytes after `STOP` are ignored, as
/// Python does.
pub fn read(input: &[u8]) -> Result<Value, PickleError> {
    let mut machine = Machine {
        input,
        pos: 0,
        op_start: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copy_budget: 16 * input.len() + (1 << 16),
    };
    let value = machine.run()?;
    Ok(Rc::try_unwrap(value).unwrap_or_else(|shared| (*shared).clone()))
}

impl Machine<'_> {
    fn error<T>(&self, message: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            offset: self.op_start,
            message: message.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.input.len() => {
                let slice = &self.input[self.pos..end];
                self.pos = end;
                Ok(slice)
            }
            _ => self.error(format!(
                "truncated: needs {n} more bytes, {} left",
                self.input.len() - self.pos
            )),
        }
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn len_u64(&mut self) -> Result<usize, PickleError> {
        let n = self.u64()?;
        usize::try_from(n).or_else(|_| self.error("length does not fit in memory"))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.input[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.error("truncated: unterminated text line");
        };
        let text = std::str::from_utf8(&rest[..end])
            .map(str::to_string)
            .or_else(|_| self.error("a text line is not UTF-8"))?;
        self.pos += end + 1;
        Ok(text)
    }

    fn push(&mut self, value: Value) {
        self.stack.push(Rc::new(value));
    }

    fn pop(&mut self) -> Result<Rc<Value>, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.error("stack underflow at a mark");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.error("stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Rc<Value>>, PickleError> {
        let Some(mark) = self.marks.pop() else {
            return self.error("no mark on the stack");
        };
        Ok(self.stack.split_off(mark))
    }

    /// The top of the stack, copied first if the memo shares it (within the copy budget).
    fn top_mut(&mut self) -> Result<&mut Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.error("stack underflow");
        }
        let top = self.stack.last().expect("checked above");
        if Rc::strong_count(top) > 1 {
            let cost = match &**top {
                Value::List(v) | Value::Tuple(v) => v.len(),
                Value::Dict(v) => v.len(),
                Value::Bytes(b) => b.len() / 64,
                _ => 1,
            } + 1;
            if cost > self.copy_budget {
                return self.error("too much copying of shared values for the input size");
            }
            self.copy_budget -= cost;
        }
        Ok(Rc::make_mut(self.stack.last_mut().expect("checked above")))
    }

    fn memo_put(&mut self, index: u32) -> Result<(), PickleError> {
        let Some(top) = self.stack.last().cloned() else {
            return self.error("memo put on an empty stack");
        };
        self.memo.insert(index, top);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<(), PickleError> {
        match self.memo.get(&index).cloned() {
            Some(v) => {
                self.stack.push(v);
                Ok(())
            }
            None => self.error(format!("memo entry {index} was never stored")),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<Value, PickleError> {
        Ok(Value::Bytes(self.take(n)?.to_vec()))
    }

    fn text(&mut self, n: usize) -> Result<Value, PickleError> {
        let raw = self.take(n)?.to_vec();
        match String::from_utf8(raw) {
            Ok(s) => Ok(Value::Str(s)),
            Err(_) => self.error("a unicode string is not UTF-8"),
        }
    }

    fn reduce(&mut self, callable: Rc<Value>, args: Rc<Value>) -> Result<Value, PickleError> {
        // Python 3 writes bytes as _codecs.encode(str, "latin1") in protocol 2.
        if let (Value::Global { module, name }, Value::Tuple(items)) = (&*callable, &*args)
            && module == "_codecs"
            && name == "encode"
            && let [text, encoding] = items.as_slice()
            && let (Value::Str(text), Some("latin1" | "latin-1")) = (&**text, encoding.as_text())
        {
            let bytes: Option<Vec<u8>> =
                text.chars().map(|c| u8::try_from(c as u32).ok()).collect();
            return match bytes {
                Some(b) => Ok(Value::Bytes(b)),
                None => self.error("_codecs.encode: a character is not latin-1"),
            };
        }
        Ok(Value::Object {
            callable,
            args,
            state: None,
        })
    }

    fn run(&mut self) -> Result<Rc<Value>, PickleError> {
        loop {
            self.op_start = self.pos;
            let op = match self.input.get(self.pos) {
                Some(&op) => op,
                None => return self.error("truncated: no STOP opcode"),
            };
            self.pos += 1;
            match op {
                b'.' => {
                    // STOP
                    return match (self.stack.len(), self.marks.is_empty()) {
                        (1, true) => Ok(self.stack.pop().expect("one value")),
                        _ => self.error("STOP with a stack that does not hold exactly one value"),
                    };
                }
                0x80 => {
                    // PROTO
                    let version = self.u8()?;
                    if version > 5 {
                        return self.error(format!("unsupported pickle protocol {version}"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only
                    self.u64()?;
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.pop()?;
                    self.stack.push(top.clone());
                    self.stack.push(top);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                    self.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v.into()));
                }
                0x8a => {
                    // LONG1: little-endian two's complement
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return self.error(format!("integer of {n} bytes is too large"));
                    }
                    let raw = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &b) in raw.iter().enumerate() {
                        v |= (b as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && raw[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v));
                }
                b'I' | b'L' => {
                    let line = self.line()?;
                    let value = match line.trim_end_matches('L') {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        digits => match digits.parse::<i64>() {
                            Ok(v) => Value::Int(v),
                            Err(_) => return self.error(format!("bad integer {line:?}")),
                        },
                    };
                    self.push(value);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.push(Value::Float(v));
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.bytes(n)?;
                    self.push(v);
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.bytes(n)?;
                    self.push(v);
                }
                0x8e => {
                    let n = self.len_u64()?;
                    let v = self.bytes(n)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.push(v);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.text(n)?;
                    self.push(v);
                }
                b']' => self.push(Value::List(Vec::new())),
                b'}' => self.push(Value::Dict(Vec::new())),
                b')' => self.push(Value::Tuple(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.error("DICT with an odd number of items");
                    }
                    let pairs = items.chunks_exact(2).map(|p| (p[0].clone(), p[1].clone()));
                    self.push(Value::Dict(pairs.collect()));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items));
                }
                b'a' => {
                    let item = self.pop()?;
                    match self.top_mut()? {
                        Value::List(items) => items.push(item),
                        other => {
                            let kind = other.kind();
                            return self.error(format!("APPEND to a {kind}"));
                        }
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top_mut()? {
                        Value::List(list) => list.extend(items),
                        other => {
                            let kind = other.kind();
                            return self.error(format!("APPENDS to a {kind}"));
                        }
                    }
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    match self.top_mut()? {
                        Value::Dict(items) => items.push((key, value)),
                        other => {
                            let kind = other.kind();
                            return self.error(format!("SETITEM on a {kind}"));
                        }
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.error("SETITEMS with an odd number of items");
                    }
                    match self.top_mut()? {
                        Value::Dict(dict) => {
                            dict.extend(items.chunks_exact(2).map(|p| (p[0].clone(), p[1].clone())))
                        }
                        other => {
                            let kind = other.kind();
                            return self.error(format!("SETITEMS on a {kind}"));
                        }
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_text(), name.as_text()) {
                        (Some(m), Some(n)) => {
                            let global = Value::Global {
                                module: m.to_string(),
                                name: n.to_string(),
                            };
                            self.push(global);
                        }
                        _ => return self.error("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    if !matches!(*args, Value::Tuple(_)) {
                        return self.error(format!("call arguments are a {}", args.kind()));
                    }
                    let value = self.reduce(callable, args)?;
                    self.push(value);
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.top_mut()? {
                        Value::Object { state: slot, .. } => *slot = Some(state),
                        other => {
                            let kind = other.kind();
                            return self.error(format!("BUILD on a {kind}"));
                        }
                    }
                }
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(i.into())?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i =
                        u32::try_from(self.memo.len()).or_else(|_| self.error("memo too large"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(i.into())?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                other => return self.error(format!("unsupported opcode 0x{other:02x}")),
            }
        }
    }
}

/// A numpy array recorded in a pickle (`_reconstruct` + `BUILD`).
#[derive(Debug, Clone, PartialEq)]
pub struct NumpyArray {
    pub shape: Vec<usize>,
    /// numpy's type string with its byte order, e.g. `|u1`, `<f4`.
    pub dtype: String,
    pub fortran_order: bool,
    pub data: Vec<u8>,
}

/// Reads a numpy array out of a pickled value, checking that its data has the size its shape and
/// dtype say.
pub fn numpy_array(value: &Value) -> Result<NumpyArray, String> {
    let Value::Object {
        callable,
        state: Some(state),
        ..
    } = value
    else {
        return Err(format!("expected a numpy array, found a {}", value.kind()));
    };
    match &**callable {
        Value::Global { module, name }
            if (module == "numpy.core.multiarray" || module == "numpy._core.multiarray")
                && name == "_reconstruct" => {}
        _ => return Err("expected a numpy array (numpy.core.multiarray._reconstruct)".into()),
    }
    let Value::Tuple(items) = &**state else {
        return Err("numpy array state is not a tuple".into());
    };
    let [_version, shape, dtype, fortran, data] = items.as_slice() else {
        return Err(format!(
            "numpy array state has {} fields, expected 5",
            items.len()
        ));
    };
    let Value::Tuple(dims) = &**shape else {
        return Err("numpy array shape is not a tuple".into());
    };
    let shape = dims
        .iter()
        .map(|d| match **d {
            Value::Int(n) if n >= 0 => Ok(n as usize),
            _ => Err("numpy array shape holds a non-integer".to_string()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let dtype = numpy_dtype(dtype)?;
    let fortran_order = matches!(**fortran, Value::Bool(true) | Value::Int(1));
    let Value::Bytes(data) = &**data else {
        return Err(format!(
            "numpy array data is a {}, expected bytes",
            data.kind()
        ));
    };
    let itemsize: usize = dtype
        .trim_start_matches(['|', '<', '>', '='])
        .get(1..)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unsupported numpy dtype {dtype}"))?;
    let expected = shape
        .iter()
        .try_fold(itemsize, |acc, &d| acc.checked_mul(d))
        .ok_or("numpy array shape overflows")?;
    if data.len() != expected {
        return Err(format!(
            "numpy array of shape {shape:?} and dtype {dtype} needs {expected} bytes, holds {}",
            data.len()
        ));
    }
    Ok(NumpyArray {
        shape,
        dtype,
        fortran_order,
        data: data.clone(),
    })
}

/// `numpy.dtype("u1", False, True)` with its BUILD state `(3, "|", ...)` -> `"|u1"`.
fn numpy_dtype(value: &Value) -> Result<String, String> {
    let Value::Object {
        callable,
        args,
        state,
    } = value
    else {
        return Err(format!("numpy dtype is a {}", value.kind()));
    };
    if !matches!(&**callable, Value::Global { module, name } if module == "numpy" && name == "dtype")
    {
        return Err("numpy dtype is not numpy.dtype".into());
    }
    let name = match &**args {
        Value::Tuple(items) => items.first().and_then(|v| v.as_text()),
        _ => None,
    }
    .ok_or("numpy dtype without a type name")?;
    let order = match state.as_deref() {
        Some(Value::Tuple(items)) => items.get(1).and_then(|v| v.as_text()).unwrap_or("|"),
        _ => "|",
    };
    Ok(format!("{order}{name}"))
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

    #[test]
    fn reads_dicts_lists_ints_floats_and_strings() {
        let value = read(&small()).unwrap();
        let a = value.get("a").unwrap();
        assert_eq!(
            **a,
            Value::List(vec![
                Rc::new(Value::Int(1)),
                Rc::new(Value::Int(300)),
                Rc::new(Value::Int(-2))
            ])
        );
        let Value::Tuple(t) = &**value.get("k").unwrap() else {
            panic!("not a tuple")
        };
        assert_eq!(*t[0], Value::None);
        assert_eq!(*t[1], Value::Bool(true));
        assert_eq!(*t[2], Value::Float(1.5));
        assert_eq!(t[3].as_text(), Some("é"));
    }

    #[test]
    fn memo_get_returns_what_was_put() {
        // [b"x", <memo 0>] with BINPUT / BINGET
        let p = b"\x80\x02]q\x00(U\x01xq\x01h\x01e.";
        let value = read(p).unwrap();
        let Value::List(items) = value else { panic!() };
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], items[1]);
        assert!(
            read(b"\x80\x02h\x05.")
                .unwrap_err()
                .message
                .contains("never stored")
        );
    }

    #[test]
    fn errors_say_where() {
        assert!(read(b"").unwrap_err().message.contains("no STOP"));
        let err = read(b"\x80\x02T\xff\xff\x00\x00ab").unwrap_err();
        assert!(err.message.contains("truncated"), "{err}");
        assert_eq!(err.offset, 2);
        assert!(
            read(b"\x80\x02\xff.")
                .unwrap_err()
                .message
                .contains("unsupported opcode 0xff")
        );
        assert!(read(b"a.").is_err());
        assert!(read(b"NN.").unwrap_err().message.contains("exactly one"));
        assert!(
            read(b"\x80\x09N.")
                .unwrap_err()
                .message
                .contains("protocol")
        );
    }

    #[test]
    fn python3_latin1_bytes_are_decoded() {
        // _codecs.encode(u"\xff\x01", "latin1")
        let p =
            b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00\xc3\xbf\x01X\x06\x00\x00\x00latin1\x86R.";
        assert_eq!(read(p).unwrap(), Value::Bytes(vec![0xff, 0x01]));
    }

    #[test]
    fn copying_shared_containers_is_bounded() {
        // A list memoised, then appended to over and over after re-memoising: each append
        // copies the list. The budget stops it long before memory does.
        let mut p = b"\x80\x02]".to_vec();
        for _ in 0..20000 {
            p.extend_from_slice(b"q\x00N\x61"); // BINPUT 0; NONE; APPEND
        }
        p.push(b'.');
        let err = read(&p).unwrap_err();
        assert!(err.message.contains("copying"), "{err}");
    }
}
