//! The values a state-dict pickle holds: Python data, callables named but not yet applied,
//! and references to the storages that tensors are rebuilt over.
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
