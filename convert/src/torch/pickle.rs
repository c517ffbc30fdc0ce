//! An allow-list unpickler for PyTorch state_dicts.
//!
//! A pickle is a program for a stack machine whose instructions can import and call any Python
//! function; `torch.load` without `weights_only` runs it. This module interprets only the data
//! opcodes a `torch.save`d state_dict uses and resolves only the globals in [`Callable`]: the
//! dict constructor, the two tensor-rebuild functions and the storage types. Anything else — a
//! `GLOBAL os system`, `builtins eval`, an object constructor — is refused with an error naming
//! it. Nothing is ever executed: "calling" an allowed global builds a plain Rust value.
//!
//! Every resource is bounded: nesting depth, stack size, memo size, mark depth, string lengths
//! (by the input length) and the total number of values built, so a hostile pickle fails with an
//! error instead of exhausting memory or the call stack.

use std::collections::HashMap;
use std::rc::Rc;

/// Deepest nesting of tuples/lists/dicts accepted (a state_dict needs 4).
pub const MAX_DEPTH: usize = 64;
/// Most values on the stack at once.
pub const MAX_STACK: usize = 1 << 20;
/// Most memo entries.
pub const MAX_MEMO: usize = 1 << 22;
/// Most open MARKs.
pub const MAX_MARKS: usize = 1 << 16;
/// Most container elements copied or created in total (guards against quadratic copying).
pub const MAX_WORK: u64 = 1 << 28;

/// Why a pickle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    #[error("pickle ends early at byte {0} (truncated?)")]
    Truncated(usize),
    #[error("pickle imports {module}.{name}, which is not on the allow-list of a PyTorch state_dict (refused; nothing was executed)")]
    ForbiddenGlobal { module: String, name: String },
    #[error("pickle opcode 0x{op:02x} ({name}) at byte {pos} is not allowed in a state_dict")]
    ForbiddenOpcode {
        op: u8,
        name: &'static str,
        pos: usize,
    },
    #[error("pickle at byte {pos}: {what}")]
    Malformed { pos: usize, what: String },
    #[error("pickle exceeds a limit at byte {pos}: {what}")]
    Limit { pos: usize, what: String },
}

/// The globals a state_dict may import. Resolving one of these does nothing but name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callable {
    /// `collections.OrderedDict`
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2`
    RebuildTensorV2,
    /// `torch._utils._rebuild_parameter`
    RebuildParameter,
    /// `torch.<X>Storage`: only ever an argument of a persistent id, never called.
    StorageType(StorageDtype),
}

/// Element types of the legacy typed storage classes (`torch.FloatStorage`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F64 | StorageDtype::I64 => 8,
            StorageDtype::F32 | StorageDtype::I32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 | StorageDtype::I16 => 2,
            StorageDtype::I8 | StorageDtype::U8 | StorageDtype::Bool => 1,
        }
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as D;
        match self {
            StorageDtype::F64 => D::F64,
            StorageDtype::F32 => D::F32,
            StorageDtype::F16 => D::F16,
            StorageDtype::BF16 => D::BF16,
            StorageDtype::I64 => D::I64,
            StorageDtype::I32 => D::I32,
            StorageDtype::I16 => D::I16,
            StorageDtype::I8 => D::I8,
            StorageDtype::U8 => D::U8,
            StorageDtype::Bool => D::BOOL,
        }
    }
}

/// The allow-list: `(module, name)` → what it stands for.
pub fn resolve_global(module: &str, name: &str) -> Option<Callable> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Callable::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Callable::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Callable::RebuildParameter,
        ("torch", s) => Callable::StorageType(match s {
            "DoubleStorage" => StorageDtype::F64,
            "FloatStorage" => StorageDtype::F32,
            "HalfStorage" => StorageDtype::F16,
            "BFloat16Storage" => StorageDtype::BF16,
            "LongStorage" => StorageDtype::I64,
            "IntStorage" => StorageDtype::I32,
            "ShortStorage" => StorageDtype::I16,
            "CharStorage" => StorageDtype::I8,
            "ByteStorage" => StorageDtype::U8,
            "BoolStorage" => StorageDtype::Bool,
            _ => return None,
        }),
        _ => return None,
    })
}

/// A reference to a storage, from a persistent id `('storage', type, key, location, numel[, view])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    pub dtype: StorageDtype,
    pub key: String,
    /// Number of elements the storage holds.
    pub numel: u64,
}

/// A tensor view: a storage plus offset, sizes and strides (all in elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

/// A container's elements with its nesting depth (kept up to date as elements are added, so
/// depth checks never walk the tree).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Seq<T> {
    pub depth: usize,
    pub items: Vec<T>,
}

/// A value built by the unpickler.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Seq<Value>>),
    List(Rc<Seq<Value>>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Rc<Seq<(Value, Value)>>),
    Global(Callable),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// Nesting depth: 0 for scalars.
    pub fn depth(&self) -> usize {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(s) => s.depth,
            _ => 0,
        }
    }

    fn as_items(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(s) | Value::List(s) => Some(&s.items),
            _ => None,
        }
    }
}

fn op_name(op: u8) -> &'static str {
    match op {
        b'F' => "FLOAT",
        b'I' => "INT",
        b'L' => "LONG",
        b'P' => "PERSID",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'g' => "GET",
        b'i' => "INST",
        b'o' => "OBJ",
        b'p' => "PUT",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// Unpickle one pickle from the start of `data`. Returns the value and the number of bytes the
/// pickle occupied (its STOP included), so that consecutive pickles can be read one by one.
pub fn unpickle(data: &[u8]) -> Result<(Value, usize), PickleError> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        work: 0,
    }
    .run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    work: u64,
}

impl Machine<'_> {
    fn malformed(&self, what: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            pos: self.pos,
            what: what.into(),
        }
    }

    fn limit(&self, what: impl Into<String>) -> PickleError {
        PickleError::Limit {
            pos: self.pos,
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A length prefix, checked against the bytes actually left (so nothing is allocated for a
    /// length the input cannot back).
    fn len(&mut self, n: u64) -> Result<usize, PickleError> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(self.limit(format!(
                "length {n} is larger than the {left} bytes left in the pickle"
            )));
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> Result<&str, PickleError> {
        const MAX_LINE: usize = 256;
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(MAX_LINE + 1)
            .position(|&b| b == b'\n')
            .ok_or_else(|| {
                if rest.len() <= MAX_LINE {
                    PickleError::Truncated(self.data.len())
                } else {
                    self.limit("GLOBAL name longer than 256 bytes")
                }
            })?;
        let start = self.pos;
        self.pos += n + 1;
        std::str::from_utf8(&self.data[start..start + n])
            .map_err(|_| self.malformed("GLOBAL name is not UTF-8"))
    }

    fn string(&mut self, n: usize) -> Result<Value, PickleError> {
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => Err(self.malformed("string is not valid UTF-8")),
        }
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.limit(format!("more than {MAX_STACK} values on the stack")));
        }
        if v.depth() > MAX_DEPTH {
            return Err(self.limit(format!("values nested deeper than {MAX_DEPTH}")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) {
            return Err(self.malformed("stack underflow"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) {
            return Err(self.malformed("stack underflow"));
        }
        let pos = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            pos,
            what: "stack underflow".into(),
        })
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK to pop to"))?;
        Ok(self.stack.split_off(m))
    }

    fn charge(&mut self, n: usize) -> Result<(), PickleError> {
        self.work += n as u64;
        if self.work > MAX_WORK {
            return Err(self.limit(format!("more than {MAX_WORK} container elements built")));
        }
        Ok(())
    }

    fn seq(&mut self, items: Vec<Value>) -> Result<Rc<Seq<Value>>, PickleError> {
        self.charge(items.len())?;
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        Ok(Rc::new(Seq { depth, items }))
    }

    fn memo_put(&mut self, idx: u32) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return Err(self.limit(format!("more than {MAX_MEMO} memo entries")));
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<(), PickleError> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.malformed(format!("memo entry {idx} was never stored")))?;
        self.push(v)
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        let g = resolve_global(module, name).ok_or_else(|| PickleError::ForbiddenGlobal {
            module: module.to_string(),
            name: name.to_string(),
        })?;
        self.push(Value::Global(g))
    }

    /// Append to the list on top of the stack (copying it first if the memo shares it).
    fn append(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        self.charge(items.len())?;
        let pos = self.pos;
        let list = match self.top()? {
            Value::List(l) => l,
            other => {
                return Err(PickleError::Malformed {
                    pos,
                    what: format!("APPEND to a {}", other.kind()),
                })
            }
        };
        let shared = Rc::strong_count(list) > 1;
        let l = Rc::make_mut(list);
        let copied = if shared { l.items.len() } else { 0 };
        for v in items {
            l.depth = l.depth.max(1 + v.depth());
            l.items.push(v);
        }
        let depth = l.depth;
        self.charge(copied)?;
        if depth > MAX_DEPTH {
            return Err(self.limit(format!("values nested deeper than {MAX_DEPTH}")));
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("SETITEMS with an odd number of values"));
        }
        self.charge(items.len() / 2)?;
        let pos = self.pos;
        let dict = match self.top()? {
            Value::Dict(d) => d,
            other => {
                return Err(PickleError::Malformed {
                    pos,
                    what: format!("SETITEM on a {}", other.kind()),
                })
            }
        };
        let shared = Rc::strong_count(dict) > 1;
        let d = Rc::make_mut(dict);
        let copied = if shared { d.items.len() } else { 0 };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.depth = d.depth.max(1 + k.depth().max(v.depth()));
            d.items.push((k, v));
        }
        let depth = d.depth;
        self.charge(copied)?;
        if depth > MAX_DEPTH {
            return Err(self.limit(format!("values nested deeper than {MAX_DEPTH}")));
        }
        Ok(())
    }

    fn run(mut self) -> Result<(Value, usize), PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.malformed(format!("unknown pickle protocol {p}")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.u64()?;
                }
                b'.' => {
                    if !self.marks.is_empty() {
                        return Err(self.malformed("STOP with an open MARK"));
                    }
                    let v = self.pop()?;
                    if !self.stack.is_empty() {
                        return Err(self.malformed("STOP with more than one value on the stack"));
                    }
                    return Ok((v, self.pos));
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.limit(format!("more than {MAX_MARKS} nested MARKs")));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i128))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i128))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i128))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    if n > 16 {
                        return Err(self.limit(format!("integer of {n} bytes (at most 16)")));
                    }
                    let b = self.take(n as usize)?;
                    let mut a = [0u8; 16];
                    a[..b.len()].copy_from_slice(b);
                    if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        for x in &mut a[b.len()..] {
                            *x = 0xff;
                        }
                    }
                    self.push(Value::Int(i128::from_le_bytes(a)))?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)))?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as u64,
                        0x8c => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'T' | b'B' => self.u32()? as u64,
                        b'U' | b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let v = Value::Bytes(Rc::from(b));
                    self.push(v)?
                }
                b')' => {
                    let s = self.seq(Vec::new())?;
                    self.push(Value::Tuple(s))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err(self.malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let s = self.seq(items)?;
                    self.push(Value::Tuple(s))?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let s = self.seq(items)?;
                    self.push(Value::Tuple(s))?
                }
                b']' => {
                    let s = self.seq(Vec::new())?;
                    self.push(Value::List(s))?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let s = self.seq(items)?;
                    self.push(Value::List(s))?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                b'}' => self.push(Value::Dict(Rc::new(Seq {
                    depth: 1,
                    items: Vec::new(),
                })))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Rc::new(Seq {
                        depth: 1,
                        items: Vec::new(),
                    })))?;
                    self.set_items(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.limit("memo index overflow"))?;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.global(&module, &name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?
                        }
                        _ => return Err(self.malformed("STACK_GLOBAL needs two strings")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = persistent_storage(&pid).map_err(|w| self.malformed(w))?;
                    self.push(Value::Storage(Rc::new(s)))?
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = reduce(&f, &args)
                        .map_err(|w| PickleError::Malformed { pos: at, what: w })?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: set an object's state. For the OrderedDict of a state_dict that is
                    // its `_metadata` attribute, and for a tensor its Python attributes; neither
                    // matters for the weights, so the state is checked for shape and dropped.
                    let _state = self.pop()?;
                    let pos = self.pos;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            return Err(PickleError::Malformed {
                                pos,
                                what: format!("BUILD on a {}", other.kind()),
                            })
                        }
                    }
                }
                _ => {
                    return Err(PickleError::ForbiddenOpcode {
                        op,
                        name: op_name(op),
                        pos: at,
                    })
                }
            }
        }
    }
}

fn int_arg(v: &Value, what: &str) -> Result<u64, String> {
    match v {
        Value::Int(i) if *i >= 0 && *i <= u64::MAX as i128 => Ok(*i as u64),
        other => Err(format!(
            "{what} must be a non-negative integer, found {}",
            other.kind()
        )),
    }
}

fn int_tuple(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    match v {
        Value::Tuple(s) => s.items.iter().map(|x| int_arg(x, what)).collect(),
        other => Err(format!(
            "{what} must be a tuple of integers, found {}",
            other.kind()
        )),
    }
}

/// Interpret a persistent id: `('storage', <storage type>, key, location, numel)` as
/// `torch.save` writes it (the legacy format adds a sixth item, `None` for whole storages).
fn persistent_storage(pid: &Value) -> Result<StorageRef, String> {
    let items = pid
        .as_items()
        .ok_or_else(|| format!("persistent id is a {}, not a tuple", pid.kind()))?;
    match items {
        [Value::Str(tag), Value::Global(Callable::StorageType(dtype)), key, _location, numel, rest @ ..]
            if &**tag == "storage" =>
        {
            match rest {
                [] | [Value::None] => {}
                _ => {
                    return Err(
                        "storage views (a persistent id with view metadata) are not supported"
                            .into(),
                    )
                }
            }
            let key = match key {
                Value::Str(k) => k.to_string(),
                other => return Err(format!("storage key is a {}, not a string", other.kind())),
            };
            Ok(StorageRef {
                dtype: *dtype,
                key,
                numel: int_arg(numel, "storage size")?,
            })
        }
        _ => Err("persistent id is not ('storage', <storage type>, key, location, size)".into()),
    }
}

/// "Call" an allowed global: build the value it would return, without running anything.
fn reduce(f: &Value, args: &Value) -> Result<Value, String> {
    let Value::Global(g) = f else {
        return Err(format!("REDUCE on a {}, which is not callable", f.kind()));
    };
    let args = args
        .as_items()
        .ok_or_else(|| format!("REDUCE arguments are a {}, not a tuple", args.kind()))?;
    match g {
        Callable::OrderedDict => {
            if !args.is_empty() {
                return Err("OrderedDict called with arguments".into());
            }
            Ok(Value::Dict(Rc::new(Seq {
                depth: 1,
                items: Vec::new(),
            })))
        }
        Callable::RebuildTensorV2 => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if !(6..=7).contains(&args.len()) {
                return Err(format!(
                    "_rebuild_tensor_v2 called with {} arguments (expected 6 or 7)",
                    args.len()
                ));
            }
            let Value::Storage(storage) = &args[0] else {
                return Err(format!(
                    "_rebuild_tensor_v2's first argument is a {}, not a storage",
                    args[0].kind()
                ));
            };
            let offset = int_arg(&args[1], "storage_offset")?;
            let size = int_tuple(&args[2], "size")?;
            let stride = int_tuple(&args[3], "stride")?;
            if size.len() != stride.len() {
                return Err(format!(
                    "tensor has {} sizes but {} strides",
                    size.len(),
                    stride.len()
                ));
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: (**storage).clone(),
                offset,
                size,
                stride,
            })))
        }
        Callable::RebuildParameter => {
            // (data, requires_grad, backward_hooks): the parameter is its data.
            match args {
                [t @ Value::Tensor(_), _, _] => Ok(t.clone()),
                _ => Err("_rebuild_parameter needs (tensor, requires_grad, hooks)".into()),
            }
        }
        Callable::StorageType(_) => Err("a storage type is not callable in a state_dict".into()),
    }
}
