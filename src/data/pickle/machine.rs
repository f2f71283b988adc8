//! The pickle machine: opcodes run over an arena of objects, then the finished graph turned
//! into a [`Value`] tree that keeps its sharing.

use std::{collections::HashMap, ops::Range};

use super::{MAX_VALUES, PickleError};

/// An index into the machine's arena.
pub(super) type Id = usize;

/// An object of the machine's arena; containers hold the ids of their items.
pub(super) enum Object {
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

pub(super) struct Machine<'a> {
    pub(super) input: &'a [u8],
    pub(super) pos: usize,
    pub(super) op_start: usize,
    pub(super) objects: Vec<Object>,
    pub(super) stack: Vec<Id>,
    /// Stack lengths at each `MARK`.
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u32, Id>,
    /// References stored in containers and the memo, counted against [`MAX_VALUES`].
    pub(super) references: usize,
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
    pub(super) fn run(&mut self) -> Result<Id, PickleError> {
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
