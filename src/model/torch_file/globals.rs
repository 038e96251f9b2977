//! The callables a state-dict pickle may name: the allow-list checked when a global is read, and
//! what applying one (REDUCE, NEWOBJ) or giving it state (BUILD) does.
use super::value::{TensorRef, Value};
use anyhow::{bail, ensure, Context, Result};
use tch::Kind;

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
pub(super) fn storage_kind(global: &str) -> Option<Kind> {
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

pub(super) fn check_global(name: &str) -> Result<()> {
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
pub(super) fn apply(callable: Value, args: Value) -> Result<Value> {
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
pub(super) fn build(target: &mut Value, _state: Value) -> Result<()> {
    match target {
        Value::Opaque(_) | Value::TensorRef(_) | Value::Dict(_) => Ok(()),
        _ => bail!("BUILD on an object that is not allowed to have state"),
    }
}
