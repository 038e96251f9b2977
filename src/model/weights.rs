//! Loading and saving safetensors state dicts into tch VarStores, strictly: every variable must
//! be present with the right shape, and unknown tensors are an error, so a wrong file never makes
//! a silently wrong model.
use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// A memory-mapped safetensors file.
pub struct MappedSafetensors {
    pub path: PathBuf,
    mmap: memmap2::Mmap,
}

impl MappedSafetensors {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the file is only read; a concurrent writer could change the bytes we read, which
        // at worst yields wrong values, never memory unsafety in safe code using the slice.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        SafeTensors::deserialize(&mmap).with_context(|| {
            format!(
                "{} is not a valid safetensors file (truncated or another format?)",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
        })
    }

    pub fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("validated when opened")
    }
}

pub fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("unsupported tensor dtype {other:?}"),
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("cannot save tensors of kind {other:?}"),
    })
}

/// Reads one tensor view into a CPU tensor of its stored kind.
pub fn view_to_tensor(view: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(
        view.data(),
        &shape,
        kind_of(view.dtype())?,
    )?)
}

/// Tensors by name, read when asked for: a map's are at hand, a file's ([`SafetensorsFile`]) are
/// read from it when asked for, and copied into another tensor a piece at a time, so that reading
/// a file into other tensors (a checkpoint into a run) adds about one piece to the memory in use.
pub trait NamedTensors {
    /// The name and shape of every tensor.
    fn shapes(&self) -> BTreeMap<String, Vec<i64>>;

    /// The tensor called `name` (on the CPU for a file's), if there is one.
    fn read(&self, name: &str) -> Result<Option<Tensor>>;

    /// Copies the tensor called `name` into `dest` (of its shape; any kind and device); false
    /// when there is no such tensor.
    fn read_into(&self, name: &str, dest: &mut Tensor) -> Result<bool> {
        let Some(t) = self.read(name)? else {
            return Ok(false);
        };
        tch::no_grad(|| dest.f_copy_(&t))?;
        Ok(true)
    }
}

impl NamedTensors for BTreeMap<String, Tensor> {
    fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        self.iter().map(|(n, t)| (n.clone(), t.size())).collect()
    }

    fn read(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.get(name).map(Tensor::shallow_clone))
    }
}

/// A tensor of a [`SafetensorsFile`]: its kind and shape, and its bytes' offset and length.
struct Located {
    kind: Kind,
    shape: Vec<i64>,
    at: u64,
    len: usize,
}

/// A safetensors file read with plain reads (never mapped, so none of it counts as the process's
/// memory): its header at once, each tensor when asked for.
pub struct SafetensorsFile {
    path: PathBuf,
    file: std::fs::File,
    /// Where the tensors' bytes start.
    data_start: u64,
    header: safetensors::tensor::Metadata,
}

impl SafetensorsFile {
    /// Opens `path` and checks its header, and that the file holds every byte it announces.
    pub fn open(path: &Path) -> Result<Self> {
        use std::io::Read;
        let invalid = || format!("{} is not a valid safetensors file", path.display());
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).with_context(invalid)?;
        let header_len = u64::from_le_bytes(len);
        ensure!(header_len <= 100_000_000, "{}: header too large", invalid());
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).with_context(invalid)?;
        let header: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).with_context(invalid)?;
        let data_start = 8 + header_len;
        let size = file.metadata()?.len();
        let expected = data_start + header.data_len() as u64;
        ensure!(
            size == expected,
            "{}: {size} bytes where its header announces {expected} (truncated?)",
            invalid()
        );
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
            header,
        })
    }

    /// Where the tensor `name` is in the file, and what it is.
    fn locate(&self, name: &str) -> Result<Option<Located>> {
        let Some(info) = self.header.info(name) else {
            return Ok(None);
        };
        let (begin, end) = info.data_offsets;
        Ok(Some(Located {
            kind: kind_of(info.dtype)?,
            shape: info.shape.iter().map(|&d| d as i64).collect(),
            at: self.data_start + begin as u64,
            len: end - begin,
        }))
    }

    fn read_bytes(&self, at: u64, bytes: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .read_exact_at(bytes, at)
            .with_context(|| format!("reading {}", self.path.display()))
    }
}

impl NamedTensors for SafetensorsFile {
    fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        self.header
            .tensors()
            .into_iter()
            .map(|(n, info)| (n, info.shape.iter().map(|&d| d as i64).collect()))
            .collect()
    }

    fn read(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(Located {
            kind,
            shape,
            at,
            len,
        }) = self.locate(name)?
        else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; len];
        self.read_bytes(at, &mut bytes)?;
        Ok(Some(Tensor::f_from_data_size(&bytes, &shape, kind)?))
    }

    /// A piece ([`WRITE_CHUNK_BYTES`]) at a time into a contiguous `dest`; a whole tensor at once
    /// into any other.
    fn read_into(&self, name: &str, dest: &mut Tensor) -> Result<bool> {
        let Some(Located {
            kind,
            shape,
            at,
            len,
        }) = self.locate(name)?
        else {
            return Ok(false);
        };
        ensure!(
            dest.size() == shape,
            "{}: tensor `{name}` has shape {shape:?}, not {:?}",
            self.path.display(),
            dest.size()
        );
        if !dest.is_contiguous() {
            let whole = self.read(name)?.context("located above")?;
            tch::no_grad(|| dest.f_copy_(&whole))?;
            return Ok(true);
        }
        let flat = dest.reshape([-1]);
        let element = kind.elt_size_in_bytes();
        let per_chunk = (WRITE_CHUNK_BYTES / element).max(1);
        let mut buffer = Vec::new();
        let mut start = 0;
        while start * element < len {
            let n = per_chunk.min(len / element - start);
            buffer.resize(n * element, 0);
            self.read_bytes(at + (start * element) as u64, &mut buffer)?;
            let piece = Tensor::f_from_data_size(&buffer, &[n as i64], kind)?;
            tch::no_grad(|| flat.narrow(0, start as i64, n as i64).f_copy_(&piece))?;
            start += n;
        }
        Ok(true)
    }
}

/// The tensors of `inner` whose names start with `prefix`, by their names without it.
pub struct Prefixed<'a, T: NamedTensors> {
    pub inner: &'a T,
    pub prefix: &'a str,
}

impl<T: NamedTensors> NamedTensors for Prefixed<'_, T> {
    fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        self.inner
            .shapes()
            .into_iter()
            .filter_map(|(n, s)| Some((n.strip_prefix(self.prefix)?.to_string(), s)))
            .collect()
    }

    fn read(&self, name: &str) -> Result<Option<Tensor>> {
        self.inner.read(&format!("{}{name}", self.prefix))
    }
}

/// Reads every tensor of a safetensors file onto the CPU, in its stored kind.
pub fn read_all(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let file = MappedSafetensors::open(path)?;
    let st = file.tensors();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = view_to_tensor(&view)
                .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
            Ok((name, t))
        })
        .collect()
}

/// Options for [`load_into`].
#[derive(Default)]
pub struct LoadOptions<'a> {
    /// Tensors in the files that the model does not have and that are known to be harmless
    /// (e.g. `text_model.embeddings.position_ids` in older CLIP checkpoints).
    pub ignore_extra: &'a [&'a str],
    /// Maps a file's tensor name to the model's, for checkpoints saved under older names.
    pub rename: Option<&'a dyn Fn(&str) -> String>,
}

/// Copies the tensors of `files` into the variables of `vs`, converting to each variable's kind.
/// Every variable must be found with its exact shape; extra tensors are an error.
pub fn load_into(vs: &nn::VarStore, files: &[PathBuf], opts: &LoadOptions) -> Result<()> {
    let mapped: Vec<MappedSafetensors> = files
        .iter()
        .map(|p| MappedSafetensors::open(p))
        .collect::<Result<_>>()?;
    let parsed: Vec<SafeTensors<'_>> = mapped.iter().map(|m| m.tensors()).collect();
    // Model name -> (file, name in that file).
    let mut index: HashMap<String, (usize, String)> = HashMap::new();
    for (i, st) in parsed.iter().enumerate() {
        for name in st.names() {
            let model_name = opts.rename.map_or_else(|| name.to_string(), |f| f(name));
            index.insert(model_name, (i, name.to_string()));
        }
    }
    let shown = files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let mut missing = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &mut variables {
            let Some(&(i, ref file_name)) = index.get(name.as_str()) else {
                missing.push(name.clone());
                continue;
            };
            let view = parsed[i].tensor(file_name)?;
            let file_shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if file_shape != var.size() {
                bail!(
                    "tensor `{name}` has shape {file_shape:?} in {} but the model expects {:?}",
                    mapped[i].path.display(),
                    var.size()
                );
            }
            let src = view_to_tensor(&view)
                .with_context(|| format!("tensor `{name}` in {}", mapped[i].path.display()))?;
            var.f_copy_(&src.to_kind(var.kind()))?;
        }
        Ok(())
    })?;
    if !missing.is_empty() {
        bail!(
            "{} model tensor(s) missing from {shown}: {}{}",
            missing.len(),
            missing
                .iter()
                .take(8)
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if missing.len() > 8 { ", ..." } else { "" }
        );
    }
    let known: std::collections::HashSet<&str> =
        variables.iter().map(|(n, _)| n.as_str()).collect();
    // Named as in the file, which is what the user can look up.
    let mut extra: Vec<&str> = index
        .iter()
        .filter(|(k, _)| !known.contains(k.as_str()) && !opts.ignore_extra.contains(&k.as_str()))
        .map(|(_, (_, file_name))| file_name.as_str())
        .collect();
    extra.sort();
    if !extra.is_empty() {
        bail!(
            "{} tensor(s) in {shown} that the model does not have (wrong model type or config?): {}{}",
            extra.len(),
            extra.iter().take(8).map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
            if extra.len() > 8 { ", ..." } else { "" }
        );
    }
    Ok(())
}

/// Writes named tensors as safetensors, atomically (temp file + rename), each in its own kind.
/// `metadata` goes into the file header. See [`write_safetensors`].
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    write_safetensors(path, tensors, Tensor::kind, metadata).map(|_| ())
}

/// Bytes of a tensor converted and copied out at a time while writing.
const WRITE_CHUNK_BYTES: usize = 16 << 20;

/// Writes named tensors as safetensors, atomically, each stored as the kind `stored_kind` gives
/// it; returns the file's SHA-256 (hex). The header comes first, from the shapes and kinds; then
/// each tensor's bytes are streamed to the file, moved to the CPU and converted a piece
/// ([`WRITE_CHUNK_BYTES`]) at a time, so that writing adds about one piece to the memory in use
/// (a whole tensor only for one that is not contiguous), however large the file. Tensors are laid
/// out as `safetensors::serialize` lays them out (by kind, widest first, then by name), so the
/// bytes are the same as its.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    stored_kind: impl Fn(&Tensor) -> Kind,
    metadata: Option<HashMap<String, String>>,
) -> Result<String> {
    let mut order: Vec<(Dtype, &str, &Tensor, Kind)> = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let kind = stored_kind(tensor);
        let dtype = dtype_of(kind).with_context(|| format!("tensor `{name}`"))?;
        order.push((dtype, name, tensor, kind));
    }
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    if let Some(pair) = order.windows(2).find(|w| w[0].1 == w[1].1) {
        bail!("two tensors named `{}` to write", pair[0].1);
    }
    let header = header_bytes(&order, metadata)?;
    crate::util::fs::write_atomic_streamed(path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut buffer = Vec::new();
        tch::no_grad(|| {
            for (_, name, tensor, kind) in &order {
                write_tensor_bytes(out, tensor, *kind, &mut buffer)
                    .with_context(|| format!("tensor `{name}`"))?;
            }
            Ok(())
        })
    })
}

/// The safetensors JSON header of `tensors` (in file order), padded with spaces to a multiple of
/// 8 bytes as the format's writers do.
fn header_bytes(
    tensors: &[(Dtype, &str, &Tensor, Kind)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut offset = 0;
    let mut infos = Vec::with_capacity(tensors.len());
    for (dtype, name, tensor, kind) in tensors {
        let bytes = tensor.numel() * kind.elt_size_in_bytes();
        infos.push((
            name.to_string(),
            safetensors::tensor::TensorInfo {
                dtype: *dtype,
                shape: tensor.size().iter().map(|&d| d as usize).collect(),
                data_offsets: (offset, offset + bytes),
            },
        ));
        offset += bytes;
    }
    let header = safetensors::tensor::Metadata::new(metadata, infos)?;
    let mut bytes = serde_json::to_vec(&header)?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok(bytes)
}

/// Streams the values of `tensor`, as `kind` in row-major order, to `out` a piece at a time
/// through `buffer`.
fn write_tensor_bytes(
    out: &mut dyn Write,
    tensor: &Tensor,
    kind: Kind,
    buffer: &mut Vec<u8>,
) -> Result<()> {
    let numel = tensor.numel();
    if numel == 0 {
        return Ok(());
    }
    // A view unless the tensor is not contiguous (e.g. channels-last): then its one copy.
    let flat = tensor.detach().contiguous().reshape([-1]);
    let element = kind.elt_size_in_bytes();
    let per_chunk = (WRITE_CHUNK_BYTES / element).max(1);
    let mut start = 0;
    while start < numel {
        let len = per_chunk.min(numel - start);
        // Views of a CPU tensor of the stored kind; a piece-sized copy otherwise.
        let piece = flat
            .narrow(0, start as i64, len as i64)
            .f_to_kind(kind)?
            .f_to_device(tch::Device::Cpu)?;
        buffer.resize(len * element, 0);
        piece.f_copy_data_u8(buffer, len)?;
        out.write_all(buffer)?;
        start += len;
    }
    Ok(())
}

/// Reads the `__metadata__` header of a safetensors file (mapping it: the tensors are not read).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let file = MappedSafetensors::open(path)?;
    let (_, meta) = SafeTensors::read_metadata(&file.mmap)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}
