//! Manifests of safetensors files: each tensor's shape and the SHA-256 of its bytes, so a test
//! checks that difftune still writes exactly the file a reference tool accepted (the fixture
//! scripts write the same manifests as JSON).
use difftune::model::weights;
use std::collections::BTreeMap;
use std::path::Path;

/// Tensor name -> (shape, sha256 of the stored bytes).
pub type Manifest = BTreeMap<String, (Vec<i64>, String)>;

/// The manifest of the safetensors file at `path`.
pub fn manifest(path: &Path) -> Manifest {
    use sha2::Digest;
    weights::read_all(path)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let n = t.numel() * t.kind().elt_size_in_bytes();
            let mut bytes = vec![0u8; n];
            t.contiguous().copy_data_u8(&mut bytes, t.numel());
            let hash: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (name, (t.size(), hash))
        })
        .collect()
}

/// The manifest `which` (e.g. `fp32`) of a fixture JSON file: `{which: {name: [dtype, shape,
/// sha256]}}`.
pub fn fixture_manifest(json: &Path, which: &str) -> Manifest {
    let text = std::fs::read_to_string(json).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[which]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let shape = v[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            (k.clone(), (shape, v[2].as_str().unwrap().to_string()))
        })
        .collect()
}
