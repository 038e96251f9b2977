//! The pickle interpreter: the opcodes `torch.save` emits, with globals checked against the
//! allow-list before anything is applied.
use super::globals::{apply, build, check_global, storage_kind};
use super::value::{StorageRef, Value};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;

/// How persistent ids (`BINPERSID`) are read.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum PersistentIds {
    None,
    /// `('storage', storage_type, key, location, numel)`
    Zip,
    /// `('storage', storage_type, root_key, location, numel, view_metadata)`
    Legacy,
}

pub(super) struct Unpickler<'a> {
    bytes: &'a [u8],
    /// Bytes read so far: where a following pickle starts in a legacy file.
    pub(super) pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    ids: PersistentIds,
}

impl<'a> Unpickler<'a> {
    pub(super) fn new(bytes: &'a [u8], ids: PersistentIds) -> Self {
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

    pub(super) fn run(&mut self) -> Result<Value> {
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
