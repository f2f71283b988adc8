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

use std::{collections::HashMap, ops::Range, rc::Rc};

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

type Id = usize;

/// An object of the machine's arena; containers hold the ids of their items.
enum Object {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Bytes still in the input, or decoded ones.
    InputBytes(Range<usize>),
    Bytes(Vec<u8>),
    Str(String),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global {
        module: String,
        name: String,
    },
    Call {
        callable: Id,
        args: Id,
        state: Option<Id>,
    },
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::None => "None",
            Object::Bool(_) => "bool",
            Object::Int(_) => "int",
            Object::Float(_) => "float",
            Object::InputBytes(_) | Object::Bytes(_) => "bytes",
            Object::Str(_) => "str",
            Object::List(_) => "list",
            Object::Tuple(_) => "tuple",
            Object::Dict(_) => "dict",
            Object::Global { .. } => "global",
            Object::Call { .. } => "object",
        }
    }
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    op_start: usize,
    objects: Vec<Object>,
    stack: Vec<Id>,
    /// Stack lengths at each `MARK`.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    /// References stored in containers and the memo, counted against [`MAX_VALUES`].
    references: usize,
}

impl Machine<'_> {
    fn error<T>(&self, message: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            offset: self.op_start,
            message: message.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<Range<usize>, PickleError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.input.len() => {
                let range = self.pos..end;
                self.pos = end;
                Ok(range)
            }
            _ => self.error(format!(
                "truncated: needs {n} more bytes, {} left",
                self.input.len() - self.pos
            )),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let range = self.take(N)?;
        let mut out = [0; N];
        out.copy_from_slice(&self.input[range]);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        self.array().map(u32::from_le_bytes)
    }

    fn len_u64(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).or_else(|_| self.error("length does not fit in memory"))
    }

    /// A text argument ending in `\n` (GLOBAL, INT, LONG, FLOAT).
    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.input[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.error("truncated: unterminated text line");
        };
        let text = match std::str::from_utf8(&rest[..end]) {
            Ok(text) => text.to_string(),
            Err(_) => return self.error("a text line is not UTF-8"),
        };
        self.pos += end + 1;
        Ok(text)
    }

    fn count_references(&mut self, n: usize) -> Result<(), PickleError> {
        self.references = self.references.saturating_add(n);
        if self.references > MAX_VALUES {
            return self.error(format!(
                "more than {MAX_VALUES} stored references: too large for this reader"
            ));
        }
        Ok(())
    }

    fn push_id(&mut self, id: Id) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_VALUES {
            return self.error(format!("stack deeper than {MAX_VALUES}"));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push(&mut self, object: Object) -> Result<(), PickleError> {
        if self.objects.len() >= MAX_VALUES {
            return self.error(format!(
                "more than {MAX_VALUES} objects: too large for this reader"
            ));
        }
        self.objects.push(object);
        self.push_id(self.objects.len() - 1)
    }

    /// The lowest stack index the current opcode may touch: the last mark.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id, PickleError> {
        if self.stack.len() <= self.floor() {
            return self.error(if self.marks.is_empty() {
                "stack underflow"
            } else {
                "stack underflow at a mark"
            });
        }
        Ok(self.stack.pop().unwrap_or_default())
    }

    fn top(&self) -> Result<Id, PickleError> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.floor() => Ok(id),
            _ => self.error("stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let Some(mark) = self.marks.pop() else {
            return self.error("no mark on the stack");
        };
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn memo_put(&mut self, index: u32) -> Result<(), PickleError> {
        let top = self.top()?;
        self.count_references(1)?;
        self.memo.insert(index, top);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<(), PickleError> {
        match self.memo.get(&index).copied() {
            Some(id) => self.push_id(id),
            None => self.error(format!("memo entry {index} was never stored")),
        }
    }

    fn text(&mut self, n: usize) -> Result<Object, PickleError> {
        let range = self.take(n)?;
        match std::str::from_utf8(&self.input[range]) {
            Ok(s) => Ok(Object::Str(s.to_string())),
            Err(_) => self.error("a unicode string is not UTF-8"),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<Object, PickleError> {
        self.take(n).map(Object::InputBytes)
    }

    fn int(&mut self, raw: &[u8]) -> Result<Object, PickleError> {
        // Little-endian two's complement, as LONG1 and LONG4 store it.
        if raw.len() > 8 {
            return self.error(format!("integer of {} bytes is too large", raw.len()));
        }
        let fill = if raw.last().is_some_and(|&b| b & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut bytes = [fill; 8];
        bytes[..raw.len()].copy_from_slice(raw);
        Ok(Object::Int(i64::from_le_bytes(bytes)))
    }

    fn text_of(&self, id: Id) -> Option<&str> {
        match &self.objects[id] {
            Object::Str(s) => Some(s),
            Object::InputBytes(r) => std::str::from_utf8(&self.input[r.clone()]).ok(),
            Object::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// `callable(*args)`: recorded, except the calls Python 3 uses to write `bytes` in
    /// protocol 2.
    fn call(&mut self, callable: Id, args: Id) -> Result<Object, PickleError> {
        let Object::Tuple(items) = &self.objects[args] else {
            let kind = self.objects[args].kind();
            return self.error(format!("call arguments are a {kind}"));
        };
        if let Object::Global { module, name } = &self.objects[callable] {
            match (module.as_str(), name.as_str(), items.as_slice()) {
                ("_codecs", "encode", &[text, encoding])
                    if matches!(self.text_of(encoding), Some("latin1" | "latin-1")) =>
                {
                    let Object::Str(text) = &self.objects[text] else {
                        return self.error("_codecs.encode of something that is not text");
                    };
                    let bytes: Option<Vec<u8>> =
                        text.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                    return match bytes {
                        Some(b) => Ok(Object::Bytes(b)),
                        None => self.error("_codecs.encode: a character is not latin-1"),
                    };
                }
                ("__builtin__" | "builtins", "bytes" | "bytearray", &[]) => {
                    return Ok(Object::Bytes(Vec::new()));
                }
                _ => {}
            }
        }
        self.count_references(2)?;
        Ok(Object::Call {
            callable,
            args,
            state: None,
        })
    }

    /// Runs to `STOP` and returns the id of the pickled object.
    fn run(&mut self) -> Result<Id, PickleError> {
        loop {
            self.op_start = self.pos;
            let Some(&op) = self.input.get(self.pos) else {
                return self.error("truncated: no STOP opcode");
            };
            self.pos += 1;
            match op {
                b'.' => {
                    // STOP
                    return match (self.stack.as_slice(), self.marks.is_empty()) {
                        (&[id], true) => Ok(id),
                        _ => self.error(format!(
                            "STOP with {} values and {} marks on the stack, expected one value",
                            self.stack.len(),
                            self.marks.len()
                        )),
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
                    // FRAME: only a length hint for buffered readers
                    self.len_u64()?;
                }
                b'(' => {
                    if self.marks.len() >= MAX_VALUES {
                        return self.error("too many marks");
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    // POP: as in Python, at a mark it discards the mark
                    if self.stack.len() > self.floor() {
                        self.stack.pop();
                    } else {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.push_id(top)?;
                }
                b'N' => self.push(Object::None)?,
                0x88 => self.push(Object::Bool(true))?,
                0x89 => self.push(Object::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Object::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Object::Int(v.into()))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Object::Int(v.into()))?;
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()? as usize;
                    let range = self.take(n)?;
                    let v = self.int(&self.input[range])?;
                    self.push(v)?;
                }
                0x8b => {
                    // LONG4
                    let n = self.u32()? as usize;
                    let range = self.take(n)?;
                    let v = self.int(&self.input[range])?;
                    self.push(v)?;
                }
                b'I' | b'L' => {
                    let line = self.line()?;
                    let value = match line.trim_end_matches('L') {
                        "01" if op == b'I' => Object::Bool(true),
                        "00" if op == b'I' => Object::Bool(false),
                        digits => match digits.parse::<i64>() {
                            Ok(v) => Object::Int(v),
                            Err(_) => return self.error(format!("bad integer {line:?}")),
                        },
                    };
                    self.push(value)?;
                }
                b'F' => {
                    let line = self.line()?;
                    match line.parse::<f64>() {
                        Ok(v) => self.push(Object::Float(v))?,
                        Err(_) => return self.error(format!("bad float {line:?}")),
                    }
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Object::Float(v))?;
                }
                b'U' | b'C' => {
                    // SHORT_BINSTRING, SHORT_BINBYTES
                    let n = self.u8()? as usize;
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                b'T' | b'B' => {
                    // BINSTRING, BINBYTES
                    let n = self.u32()? as usize;
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                0x8e | 0x96 => {
                    // BINBYTES8, BYTEARRAY8
                    let n = self.len_u64()?;
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.push(v)?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.text(n)?;
                    self.push(v)?;
                }
                b']' => self.push(Object::List(Vec::new()))?,
                b'}' => self.push(Object::Dict(Vec::new()))?,
                b')' => self.push(Object::Tuple(Vec::new()))?,
                b'l' | b't' => {
                    let items = self.pop_mark()?;
                    self.count_references(items.len())?;
                    self.push(if op == b'l' {
                        Object::List(items)
                    } else {
                        Object::Tuple(items)
                    })?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.error("DICT with an odd number of items");
                    }
                    self.count_references(items.len())?;
                    let pairs = items.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    self.push(Object::Dict(pairs))?;
                }
                0x85..=0x87 => {
                    // TUPLE1, TUPLE2, TUPLE3
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < self.floor() + n {
                        return self.error(format!("TUPLE{n} needs {n} values on the stack"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.count_references(n)?;
                    self.push(Object::Tuple(items))?;
                }
                b'a' | b'e' => {
                    // APPEND, APPENDS
                    let items = if op == b'a' {
                        vec![self.pop()?]
                    } else {
                        self.pop_mark()?
                    };
                    let list = self.top()?;
                    self.count_references(items.len())?;
                    match &mut self.objects[list] {
                        Object::List(list) => list.extend(items),
                        other => {
                            let kind = other.kind();
                            return self.error(format!("APPEND to a {kind}"));
                        }
                    }
                }
                b's' | b'u' => {
                    // SETITEM, SETITEMS
                    let items = if op == b's' {
                        let value = self.pop()?;
                        let key = self.pop()?;
                        vec![key, value]
                    } else {
                        self.pop_mark()?
                    };
                    if items.len() % 2 != 0 {
                        return self.error("SETITEMS with an odd number of items");
                    }
                    let dict = self.top()?;
                    self.count_references(items.len())?;
                    match &mut self.objects[dict] {
                        Object::Dict(dict) => {
                            dict.extend(items.chunks_exact(2).map(|p| (p[0], p[1])))
                        }
                        other => {
                            let kind = other.kind();
                            return self.error(format!("SETITEM on a {kind}"));
                        }
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Object::Global { module, name })?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.objects[module], &self.objects[name]) {
                        (Object::Str(m), Object::Str(n)) => {
                            let global = Object::Global {
                                module: m.clone(),
                                name: n.clone(),
                            };
                            self.push(global)?;
                        }
                        _ => return self.error("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' | 0x81 => {
                    // REDUCE, NEWOBJ
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let object = self.call(callable, args)?;
                    self.push(object)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    self.count_references(1)?;
                    match &mut self.objects[target] {
                        Object::Call { state: slot, .. } => *slot = Some(state),
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
                    // MEMOIZE
                    let i = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
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

/// Turns the finished arena into a [`Value`] tree, each shared object built once.
struct TreeBuilder<'m, 'a> {
    machine: &'m Machine<'a>,
    done: Vec<Option<Rc<Value>>>,
    in_progress: Vec<bool>,
    /// Offset of `STOP`, for errors found here.
    stop: usize,
}

impl TreeBuilder<'_, '_> {
    fn error<T>(&self, message: &str) -> Result<T, PickleError> {
        Err(PickleError {
            offset: self.stop,
            message: message.to_string(),
        })
    }

    fn build(&mut self, id: Id, depth: usize) -> Result<Rc<Value>, PickleError> {
        if let Some(done) = &self.done[id] {
            return Ok(done.clone());
        }
        if self.in_progress[id] {
            return self.error("a value contains itself (recursive values are not supported)");
        }
        if depth >= MAX_DEPTH {
            return self.error(&format!("values nested more than {MAX_DEPTH} deep"));
        }
        self.in_progress[id] = true;
        let machine = self.machine;
        let items = |ids: &[Id], this: &mut Self| -> Result<Vec<Rc<Value>>, PickleError> {
            ids.iter().map(|&i| this.build(i, depth + 1)).collect()
        };
        let value = match &machine.objects[id] {
            Object::None => Value::None,
            Object::Bool(b) => Value::Bool(*b),
            Object::Int(i) => Value::Int(*i),
            Object::Float(f) => Value::Float(*f),
            Object::InputBytes(r) => Value::Bytes(machine.input[r.clone()].to_vec()),
            Object::Bytes(b) => Value::Bytes(b.clone()),
            Object::Str(s) => Value::Str(s.clone()),
            Object::List(ids) => Value::List(items(ids, self)?),
            Object::Tuple(ids) => Value::Tuple(items(ids, self)?),
            Object::Dict(pairs) => Value::Dict(
                pairs
                    .iter()
                    .map(|&(k, v)| Ok((self.build(k, depth + 1)?, self.build(v, depth + 1)?)))
                    .collect::<Result<_, PickleError>>()?,
            ),
            Object::Global { module, name } => Value::Global {
                module: module.clone(),
                name: name.clone(),
            },
            Object::Call {
                callable,
                args,
                state,
            } => Value::Object {
                callable: self.build(*callable, depth + 1)?,
                args: self.build(*args, depth + 1)?,
                state: state.map(|s| self.build(s, depth + 1)).transpose()?,
            },
        };
        let value = Rc::new(value);
        self.in_progress[id] = false;
        self.done[id] = Some(value.clone());
        Ok(value)
    }
}

/// A numpy array recorded in a pickle, its data borrowed from the [`Value`].
#[derive(Debug, Clone, PartialEq)]
pub struct NumpyArray<'v> {
    pub shape: Vec<usize>,
    /// numpy's type string with its byte order, e.g. `|u1`, `<f4`.
    pub dtype: String,
    pub fortran_order: bool,
    pub data: &'v [u8],
}

/// Reads a numpy array out of a pickled value, checking that its data has the size its shape and
/// dtype say. Understands `numpy.core.multiarray._reconstruct` + `BUILD` (protocols 0-4, and
/// `numpy._core` of numpy 2) and `numpy.core.numeric._frombuffer` (protocol 5, in-band data).
pub fn numpy_array(value: &Value) -> Result<NumpyArray<'_>, String> {
    let Value::Object {
        callable,
        args,
        state,
    } = value
    else {
        return Err(format!("expected a numpy array, found a {}", value.kind()));
    };
    let Value::Global { module, name } = &**callable else {
        return Err("expected a numpy array, found an object that is not one".into());
    };
    let numpy_core = |sub: &str| {
        module
            .strip_prefix("numpy.core.")
            .or(module.strip_prefix("numpy._core."))
            == Some(sub)
    };
    let (shape, dtype, fortran, data) = if numpy_core("multiarray") && name == "_reconstruct" {
        let Some(state) = state else {
            return Err("numpy array without its state (no BUILD)".into());
        };
        let Value::Tuple(items) = &**state else {
            return Err("numpy array state is not a tuple".into());
        };
        match items.as_slice() {
            [_, shape, dtype, fortran, data] | [shape, dtype, fortran, data] => {
                let fortran = match **fortran {
                    Value::Bool(b) => b,
                    Value::Int(i) => i != 0,
                    _ => return Err("numpy array order flag is not a bool".into()),
                };
                (shape, dtype, fortran, data)
            }
            _ => {
                return Err(format!(
                    "numpy array state has {} fields, expected 4 or 5",
                    items.len()
                ));
            }
        }
    } else if numpy_core("numeric") && name == "_frombuffer" {
        let Value::Tuple(items) = &**args else {
            return Err("numpy _frombuffer arguments are not a tuple".into());
        };
        let [data, dtype, shape, order] = items.as_slice() else {
            return Err("numpy _frombuffer needs 4 arguments".into());
        };
        let fortran = match order.as_text() {
            Some("C") => false,
            Some("F") => true,
            _ => return Err("numpy _frombuffer order is not 'C' or 'F'".into()),
        };
        (shape, dtype, fortran, data)
    } else {
        return Err(format!(
            "expected a numpy array, found a call of {module}.{name}"
        ));
    };
    let Value::Tuple(dims) = &**shape else {
        return Err("numpy array shape is not a tuple".into());
    };
    let shape = dims
        .iter()
        .map(|d| match **d {
            Value::Int(n) => usize::try_from(n).ok(),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or("numpy array shape holds something that is not a size")?;
    let dtype = numpy_dtype(dtype)?;
    let itemsize =
        dtype_itemsize(&dtype).ok_or_else(|| format!("unsupported numpy dtype {dtype}"))?;
    let Value::Bytes(data) = &**data else {
        return Err(format!(
            "numpy array data is a {}, expected bytes",
            data.kind()
        ));
    };
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
        fortran_order: fortran,
        data,
    })
}

/// Bytes per item of a plain numeric or byte-string dtype such as `|u1`, `<f4`, `|S10`.
fn dtype_itemsize(dtype: &str) -> Option<usize> {
    let code = dtype.trim_start_matches(['|', '<', '>', '=']);
    let mut chars = code.chars();
    let kind = chars.next()?;
    let size: usize = chars.as_str().parse().ok()?;
    (matches!(kind, 'b' | 'i' | 'u' | 'f' | 'c' | 'S' | 'V') && size > 0).then_some(size)
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
