//! Reading PyTorch `torch.save` files (`.ckpt`, `.pt`, `.pth`) without executing them. A pickle is
//! a program; this reader interprets only the opcodes and the few callables (`collections.
//! OrderedDict`, `torch._utils._rebuild_tensor_v2`, the typed storages) that a saved state dict
//! uses, plus a short list of data-only classes that Lightning checkpoints carry, which become
//! inert placeholders. Any other callable (`os.system`, `builtins.eval`, ...) is refused before
//! anything is built, and nothing in the file is ever run. Both the zip format (torch >= 1.6) and
//! the legacy format (magic number, pickles, then raw storages) are read; little-endian only.
mod globals;
mod pickle;
mod storage;
mod value;

pub use value::{StorageRef, TensorRef, Value};

use anyhow::{bail, ensure, Context, Result};
use pickle::{PersistentIds, Unpickler};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};
use std::path::Path;
use storage::materialize;
use tch::{Kind, Tensor};

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
