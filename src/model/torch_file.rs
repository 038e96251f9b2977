//! Reading PyTorch `torch.save` files (`.ckpt`, `.pt`, `.pth`) without executing them. A pickle is
//! a program; this reader interprets only the opcodes and the few callables (`collections.
//! OrderedDict`, `torch._utils._rebuild_tensor_v2`, the typed storages) that a saved state dict
//! uses, plus a short list of data-only classes that Lightning checkpoints carry, which become
//! inert placeholders. Any other callable (`os.system`, `builtins.eval`, ...) is refused before
//! anything is built, and nothing in the file is ever run. Both the zip format (torch >= 1.6) and
//! the legacy format (magic number, pickles, then raw storages) are read; little-endian only.
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};
use std::path::Path;
use tch::{Kind, Tensor};

/// A pickled value, with tensors materialised.
#[derive(Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Dicts and OrderedDicts, in insertion order.
    Dict(Vec<(Value, Value)>),
    Tensor(Tensor),
    /// An allowed data-only object (e.g. a Lightning callback's state), kept by its class name.
    Opaque(String),
    /// A callable named by the pickle, before it is applied.
    Global(String),
    /// A reference to a storage (from a persistent id), before a tensor is rebuilt over it.
    Storage(StorageRef),
    /// A tensor view of a storage, materialised once every storage can be read.
    TensorRef(TensorRef),
}

impl Clone for Value {
    fn clone(&self) -> Self {
        match self {
            Value::None => Value::None,
            Value::Bool(b) => Value::Bool(*b),
            Value::Int(i) => Value::Int(*i),
            Value::BigInt(b) => Value::BigInt(b.clone()),
            Value::Float(f) => Value::Float(*f),
            Value::Str(s) => Value::Str(s.clone()),
            Value::Bytes(b) => Value::Bytes(b.clone()),
            Value::List(v) => Value::List(v.clone()),
            Value::Tuple(v) => Value::Tuple(v.clone()),
            Value::Dict(v) => Value::Dict(v.clone()),
            Value::Tensor(t) => Value::Tensor(t.shallow_clone()),
            Value::Opaque(s) => Value::Opaque(s.clone()),
            Value::Global(s) => Value::Global(s.clone()),
            Value::Storage(s) => Value::Storage(s.clone()),
            Value::TensorRef(t) => Value::TensorRef(t.clone()),
        }
    }
}

impl Value {
    /// The entry `key` of a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StorageRef {
    pub key: String,
    pub kind: Kind,
    /// Elements in the storage.
    pub numel: i64,
}

#[derive(Debug, Clone)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// Callables a state dict needs, interpreted here.
const REBUILD_TENSOR: &[&str] = &[
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor",
];
const REBUILD_PARAMETER: &str = "torch._utils._rebuild_parameter";
const ORDERED_DICT: &str = "collections.OrderedDict";
/// Data-only classes found in Lightning checkpoints next to the state dict; they are never called,
/// only replaced by [`Value::Opaque`].
const OPAQUE_CLASSES: &[&str] = &[
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "_codecs.encode",
    "torch.torch_version.TorchVersion",
];

/// The element kind of a typed storage class (`torch.FloatStorage`, ...).
fn storage_kind(global: &str) -> Option<Kind> {
    Some(match global.strip_prefix("torch.")? {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn check_global(name: &str) -> Result<()> {
    let allowed = REBUILD_TENSOR.contains(&name)
        || name == REBUILD_PARAMETER
        || name == ORDERED_DICT
        || OPAQUE_CLASSES.contains(&name)
        || storage_kind(name).is_some();
    if !allowed {
        bail!(
            "the pickle calls `{name}`, which is not part of a tensor state dict; refusing the file \
             (difftune reads only tensor data from .ckpt/.pt files and never runs their code)"
        );
    }
    Ok(())
}

/// Reads the tensors of a checkpoint's state dict onto the CPU, in their stored kinds: the
/// `state_dict` entry when there is one (Lightning checkpoints such as the original SD `.ckpt`
/// files), else the top-level dict. Entries that are not tensors are skipped.
pub fn read_state_dict(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    read_state_dict_of(&load(path)?, path)
}

/// [`read_state_dict`] of an already loaded `value` (read from `path`, named in errors).
pub fn read_state_dict_of(value: &Value, path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let dict = match value.get("state_dict") {
        Some(inner @ Value::Dict(_)) => inner,
        _ => value,
    };
    let Value::Dict(items) = dict else {
        bail!("{} does not hold a dict of tensors", path.display());
    };
    Ok(items
        .iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(name), Value::Tensor(t)) => Some((name.clone(), t.shallow_clone())),
            _ => None,
        })
        .collect())
}

/// Reads the whole pickled object of a `torch.save` file, with tensors on the CPU.
pub fn load(path: &Path) -> Result<Value> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    file.rewind()?;
    let result = if n == 4 && magic == *b"PK\x03\x04" {
        load_zip(file)
    } else {
        load_legacy(std::io::BufReader::new(file))
    };
    result.with_context(|| format!("reading the PyTorch file {}", path.display()))
}

fn load_zip(file: std::fs::File) -> Result<Value> {
    let mut archive = zip::ZipArchive::new(file).context("not a valid zip archive")?;
    let pickle_name = archive
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .map(str::to_string)
        .context("no data.pkl in the archive (not a torch.save file)")?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut entry) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        entry.read_to_string(&mut order)?;
        ensure!(
            order.trim() == "little",
            "big-endian tensor data is not supported"
        );
    }
    let mut pickle = Vec::new();
    archive.by_name(&pickle_name)?.read_to_end(&mut pickle)?;
    let value = Unpickler::new(&pickle, PersistentIds::Zip).run()?;
    let mut read_storage = |s: &StorageRef| -> Result<Vec<u8>> {
        let name = format!("{prefix}data/{}", s.key);
        let mut entry = archive
            .by_name(&name)
            .with_context(|| format!("storage {name} is missing"))?;
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    materialize(value, &mut read_storage, &mut HashMap::new())
}

/// `torch.save`'s magic number (`0x1950a86a20f9469cfc6c`) as pickled little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn load_legacy(mut reader: impl Read) -> Result<Value> {
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes)?;
    let mut pos = 0;
    let mut next = |ids: PersistentIds| -> Result<Value> {
        let mut u = Unpickler::new(&bytes[pos..], ids);
        let v = u.run()?;
        pos += u.pos;
        Ok(v)
    };
    let magic =
        next(PersistentIds::None).context("neither a zip archive nor a legacy torch.save file")?;
    ensure!(
        matches!(&magic, Value::BigInt(b) if *b == LEGACY_MAGIC),
        "neither a zip archive nor a legacy torch.save file (wrong magic number)"
    );
    let _protocol = next(PersistentIds::None)?;
    let sys_info = next(PersistentIds::None)?;
    ensure!(
        !matches!(sys_info.get("little_endian"), Some(Value::Bool(false))),
        "big-endian tensor data is not supported"
    );
    let value = next(PersistentIds::Legacy)?;
    let Value::List(keys) = next(PersistentIds::None)? else {
        bail!("the legacy file's storage key list is missing");
    };
    // Each storage follows in key order: its element count (i64), then its bytes.
    let mut kinds = HashMap::new();
    collect_storages(&value, &mut kinds);
    let mut data: HashMap<String, Vec<u8>> = HashMap::new();
    let mut rest = &bytes[pos..];
    for key in keys {
        let Value::Str(key) = key else {
            bail!("a storage key is not a string");
        };
        let kind = *kinds
            .get(&key)
            .with_context(|| format!("storage {key} is listed but not used"))?;
        ensure!(rest.len() >= 8, "storage {key} is truncated");
        let numel = i64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let len = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(kind.elt_size_in_bytes()))
            .filter(|&n| n <= rest.len() - 8)
            .with_context(|| format!("storage {key} is truncated"))?;
        data.insert(key, rest[8..8 + len].to_vec());
        rest = &rest[8 + len..];
    }
    let mut read_storage = |s: &StorageRef| -> Result<Vec<u8>> {
        data.remove(&s.key)
            .with_context(|| format!("storage {} is missing", s.key))
    };
    materialize(value, &mut read_storage, &mut HashMap::new())
}

/// The element kind of every storage the value's tensors use.
fn collect_storages(value: &Value, kinds: &mut HashMap<String, Kind>) {
    match value {
        Value::TensorRef(t) => {
            kinds.insert(t.storage.key.clone(), t.storage.kind);
        }
        Value::List(v) | Value::Tuple(v) => v.iter().for_each(|x| collect_storages(x, kinds)),
        Value::Dict(v) => v.iter().for_each(|(_, x)| collect_storages(x, kinds)),
        _ => {}
    }
}

/// How persistent ids (`BINPERSID`) are read.
#[derive(Clone, Copy, PartialEq)]
enum PersistentIds {
    None,
    /// `('storage', storage_type, key, location, numel)`
    Zip,
    /// `('storage', storage_type, root_key, location, numel, view_metadata)`
    Legacy,
}

struct Unpickler<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    ids: PersistentIds,
}

impl<'a> Unpickler<'a> {
    fn new(bytes: &'a [u8], ids: PersistentIds) -> Self {
        Self {
            bytes,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            ids,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.context("the pickle is truncated")?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("the pickle pops an empty stack")
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self.marks.pop().context("the pickle has no mark to pop")?;
        ensure!(
            mark <= self.stack.len(),
            "the pickle's mark is past the stack"
        );
        Ok(self.stack.split_off(mark))
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().context("the pickle's stack is empty")
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(bytes)
                .context("a pickled string is not UTF-8")?
                .to_string(),
        ))
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            if op == b'.' {
                return self.pop();
            }
            self.step(op)
                .with_context(|| format!("pickle opcode 0x{op:02x} at byte {at}"))?;
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        if let Some(v) = self.literal(op)? {
            self.stack.push(v);
            return Ok(());
        }
        match op {
            0x80 => {
                self.u8()?; // PROTO
            }
            0x95 => {
                self.take(8)?; // FRAME
            }
            b'(' => self.marks.push(self.stack.len()),
            b'q' => {
                let i = self.u8()?.into();
                self.memoize(i)?;
            }
            b'r' => {
                let i = self.u32()?;
                self.memoize(i)?;
            }
            0x94 => {
                let i = self.memo.len() as u32;
                self.memoize(i)?;
            }
            b'h' | b'j' => {
                let i = if op == b'h' {
                    self.u8()?.into()
                } else {
                    self.u32()?
                };
                let v = self
                    .memo
                    .get(&i)
                    .context("the pickle reads an unset memo slot")?;
                self.stack.push(v.clone());
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v);
            }
            _ => self.step_structure(op)?,
        }
        Ok(())
    }

    /// The value a literal opcode pushes (numbers, strings, bytes, empty containers), or None
    /// when `op` is not a literal.
    fn literal(&mut self, op: u8) -> Result<Option<Value>> {
        let v = match op {
            b'}' => Value::Dict(Vec::new()),
            b']' => Value::List(Vec::new()),
            b')' => Value::Tuple(Vec::new()),
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'J' => {
                Value::Int(i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")).into())
            }
            b'K' => Value::Int(self.u8()?.into()),
            b'M' => {
                Value::Int(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")).into())
            }
            0x8a => {
                let n = self.u8()? as usize;
                long_value(self.take(n)?)
            }
            b'G' => Value::Float(f64::from_be_bytes(
                self.take(8)?.try_into().expect("8 bytes"),
            )),
            b'X' => {
                let n = self.u32()? as usize;
                self.string(n)?
            }
            0x8c => {
                let n = self.u8()? as usize;
                self.string(n)?
            }
            b'B' | b'T' => {
                let n = self.u32()? as usize;
                Value::Bytes(self.take(n)?.to_vec())
            }
            b'C' | b'U' => {
                let n = self.u8()? as usize;
                Value::Bytes(self.take(n)?.to_vec())
            }
            _ => return Ok(None),
        };
        Ok(Some(v))
    }

    fn memoize(&mut self, slot: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(slot, v);
        Ok(())
    }

    /// Opcodes that build containers, name callables or apply them.
    fn step_structure(&mut self, op: u8) -> Result<()> {
        match op {
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                ensure!(self.stack.len() >= n, "the pickle's stack is too short");
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(items));
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let global = format!("{module}.{name}");
                check_global(&global)?;
                self.stack.push(Value::Global(global));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    bail!("STACK_GLOBAL needs two strings");
                };
                let global = format!("{module}.{name}");
                check_global(&global)?;
                self.stack.push(Value::Global(global));
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = apply(callable, args)?;
                self.stack.push(v);
            }
            b'b' => {
                let state = self.pop()?;
                build(self.top()?, state)?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent(pid)?;
                self.stack.push(v);
            }
            _ => bail!("unsupported pickle opcode (not used by torch.save state dicts)"),
        }
        Ok(())
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("the pickle is truncated")?;
        let s = std::str::from_utf8(&rest[..end]).context("a global name is not UTF-8")?;
        self.pos += end + 1;
        Ok(s.to_string())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(list) => list.extend(items),
            Value::Opaque(_) => {}
            _ => bail!("APPEND to something that is not a list"),
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        ensure!(
            items.len().is_multiple_of(2),
            "SETITEMS with an odd number of items"
        );
        let Value::Dict(dict) = self.top()? else {
            bail!("SETITEM on something that is not a dict");
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dict.push((k, v));
        }
        Ok(())
    }

    fn persistent(&mut self, pid: Value) -> Result<Value> {
        let Value::Tuple(items) = pid else {
            bail!("a persistent id is not a tuple");
        };
        let (expected, what) = match self.ids {
            PersistentIds::None => bail!("unexpected persistent id"),
            PersistentIds::Zip => (5, "zip"),
            PersistentIds::Legacy => (6, "legacy"),
        };
        ensure!(
            items.len() == expected,
            "a {what}-format storage id has {} fields, expected {expected}",
            items.len()
        );
        let (Value::Str(tag), Value::Global(class), Value::Str(key), Value::Int(numel)) =
            (&items[0], &items[1], &items[2], &items[4])
        else {
            bail!("a persistent id is not ('storage', type, key, location, numel)");
        };
        ensure!(tag == "storage", "unknown persistent id `{tag}`");
        if self.ids == PersistentIds::Legacy {
            ensure!(
                matches!(items[5], Value::None),
                "storage views (files from PyTorch before 0.4) are not supported"
            );
        }
        let kind = storage_kind(class).with_context(|| format!("`{class}` is not a storage"))?;
        ensure!(*numel >= 0, "negative storage size");
        Ok(Value::Storage(StorageRef {
            key: key.clone(),
            kind,
            numel: *numel,
        }))
    }
}

/// A LONG1 integer: little-endian two's complement.
fn long_value(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::BigInt(bytes.to_vec());
    }
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut buf = [if negative { 0xff } else { 0 }; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>> {
    let Value::Tuple(items) = v else {
        bail!("the tensor's {what} is not a tuple");
    };
    items
        .iter()
        .map(|i| match i {
            Value::Int(i) => Ok(*i),
            _ => bail!("the tensor's {what} holds a non-integer"),
        })
        .collect()
}

/// REDUCE / NEWOBJ: applies one of the allowed callables.
fn apply(callable: Value, args: Value) -> Result<Value> {
    let Value::Global(name) = callable else {
        bail!("the pickle calls something that is not an allowed global");
    };
    let Value::Tuple(args) = args else {
        bail!("`{name}` is called without an argument tuple");
    };
    if REBUILD_TENSOR.contains(&name.as_str()) {
        ensure!(
            args.len() >= 4,
            "`{name}` needs (storage, offset, size, stride)"
        );
        let (Value::Storage(storage), Value::Int(offset)) = (&args[0], &args[1]) else {
            bail!("`{name}` needs a storage and an offset");
        };
        return Ok(Value::TensorRef(TensorRef {
            storage: storage.clone(),
            offset: *offset,
            size: ints(&args[2], "size")?,
            stride: ints(&args[3], "stride")?,
        }));
    }
    if name == REBUILD_PARAMETER {
        return args.into_iter().next().context("a parameter without data");
    }
    if name == ORDERED_DICT {
        ensure!(args.is_empty(), "OrderedDict with arguments");
        return Ok(Value::Dict(Vec::new()));
    }
    Ok(Value::Opaque(name))
}

/// BUILD: sets an object's state. Only inert objects (and tensors' empty hooks state) take one.
fn build(target: &mut Value, _state: Value) -> Result<()> {
    match target {
        Value::Opaque(_) | Value::TensorRef(_) | Value::Dict(_) => Ok(()),
        _ => bail!("BUILD on an object that is not allowed to have state"),
    }
}

/// Replaces every [`Value::TensorRef`] by a CPU tensor read from its storage.
fn materialize(
    value: Value,
    read: &mut dyn FnMut(&StorageRef) -> Result<Vec<u8>>,
    cache: &mut HashMap<String, Tensor>,
) -> Result<Value> {
    Ok(match value {
        Value::TensorRef(t) => Value::Tensor(rebuild(&t, read, cache)?),
        Value::List(v) => Value::List(
            v.into_iter()
                .map(|x| materialize(x, read, cache))
                .collect::<Result<_>>()?,
        ),
        Value::Tuple(v) => Value::Tuple(
            v.into_iter()
                .map(|x| materialize(x, read, cache))
                .collect::<Result<_>>()?,
        ),
        Value::Dict(v) => Value::Dict(
            v.into_iter()
                .map(|(k, x)| Ok((k, materialize(x, read, cache)?)))
                .collect::<Result<_>>()?,
        ),
        other => other,
    })
}

fn rebuild(
    t: &TensorRef,
    read: &mut dyn FnMut(&StorageRef) -> Result<Vec<u8>>,
    cache: &mut HashMap<String, Tensor>,
) -> Result<Tensor> {
    let s = &t.storage;
    ensure!(
        t.size.len() == t.stride.len(),
        "tensor over storage {}: size {:?} and stride {:?} differ in rank",
        s.key,
        t.size,
        t.stride
    );
    // The view must stay inside the storage: as_strided does not check.
    let empty = t.size.contains(&0);
    let valid = t.offset >= 0
        && t.size.iter().all(|&d| d >= 0)
        && t.stride.iter().all(|&d| d >= 0)
        && (empty
            || t.size
                .iter()
                .zip(&t.stride)
                .try_fold(t.offset, |acc, (&d, &st)| {
                    acc.checked_add((d - 1).checked_mul(st)?)
                })
                .is_some_and(|last| last < s.numel));
    ensure!(
        valid,
        "tensor with size {:?}, stride {:?} and offset {} does not fit its storage {} of {} elements",
        t.size,
        t.stride,
        t.offset,
        s.key,
        s.numel
    );
    if !cache.contains_key(&s.key) {
        let bytes = read(s)?;
        let need = s.numel as usize * s.kind.elt_size_in_bytes();
        ensure!(
            bytes.len() >= need,
            "storage {} has {} bytes, expected {need}",
            s.key,
            bytes.len()
        );
        let flat = Tensor::f_from_data_size(&bytes[..need], &[s.numel], s.kind)?;
        cache.insert(s.key.clone(), flat);
    }
    let flat = &cache[&s.key];
    Ok(flat
        .f_as_strided(&t.size, &t.stride, Some(t.offset))?
        .contiguous())
}
