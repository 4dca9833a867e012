//! Reads PyTorch `.pt` files — the zip format of `torch.save` (1.6+) and the legacy non-zip
//! format before it — into a tree of plain values with the tensors loaded, walking the pickle
//! through candle's pickle objects. Megatron and DeepSpeed checkpoints are nested dicts of this
//! kind (`{'model': {'language_model': {...}}, 'args': Namespace(...), ...}`).
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Error, Result, Tensor};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;

/// A value of the pickled object tree.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    /// Dicts, OrderedDicts, and objects whose state is a dict (`argparse.Namespace`).
    Dict(Vec<(String, Value)>),
    Tensor(Tensor),
    /// Anything else (numpy arrays, unknown classes), described.
    Other(String),
}

impl Value {
    /// The entry `key` of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(d) => d.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Every tensor under this value, keyed by its dotted path (`a.b.weight`).
    pub fn flatten_tensors(&self) -> Vec<(String, Tensor)> {
        fn walk(v: &Value, prefix: &str, out: &mut Vec<(String, Tensor)>) {
            match v {
                Value::Tensor(t) => out.push((prefix.to_string(), t.clone())),
                Value::Dict(d) => {
                    for (k, v) in d {
                        let p = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(v, &p, out);
                    }
                }
                Value::List(l) => {
                    for (i, v) in l.iter().enumerate() {
                        walk(v, &format!("{prefix}.{i}"), out);
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(self, "", &mut out);
        out
    }
}

fn msg(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{}: {e}", path.display()))
}

/// Magic number pickled first in a legacy (non-zip) torch.save file: `\x80\x02\x8a\x0a` + the
/// 10-byte little-endian long 0x1950a86a20f9469cfc6c + STOP.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// Loads a `.pt` file (zip or legacy format) with its tensors on the CPU.
pub fn load(path: &Path) -> Result<Value> {
    let mut head = [0u8; 15];
    let mut f = std::fs::File::open(path).map_err(|e| msg(path, e))?;
    let n = f.read(&mut head).map_err(|e| msg(path, e))?;
    if n >= 4 && head[..4] == *b"PK\x03\x04" {
        load_zip(path)
    } else if n == 15 && head == LEGACY_MAGIC {
        load_legacy(path)
    } else {
        Err(msg(
            path,
            "not a PyTorch checkpoint (neither a torch.save zip nor the legacy format)",
        ))
    }
}

fn read_pickle<R: BufRead>(r: &mut R, path: &Path) -> Result<Object> {
    let mut stack = Stack::empty();
    stack
        .read_loop(r)
        .map_err(|e| msg(path, format!("cannot unpickle: {e}")))?;
    stack.finalize()
}

fn load_zip(path: &Path) -> Result<Value> {
    let file = std::fs::File::open(path).map_err(|e| msg(path, e))?;
    // Sizes in a damaged archive can claim anything; no entry of a stored torch zip is larger
    // than the file.
    let file_len = file.metadata().map_err(|e| msg(path, e))?.len();
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| msg(path, e))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.to_string()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| msg(path, "zip without data.pkl"))?;
    let root = pkl.trim_end_matches("data.pkl").to_string();
    let obj = {
        let entry = zip.by_name(&pkl).map_err(|e| msg(path, e))?;
        read_pickle(&mut BufReader::new(entry), path)?
    };
    let mut storage = |key: &str| -> Result<Vec<u8>> {
        // A storage key names an entry of this archive's data/ folder: a plain name, no path.
        if key.is_empty() || key.contains(['/', '\\']) || key == ".." || key == "." {
            return Err(msg(
                path,
                format!("storage key `{key}` is not a name inside the archive's data/ folder"),
            ));
        }
        let name = format!("{root}data/{key}");
        let mut entry = zip
            .by_name(&name)
            .map_err(|e| msg(path, format!("storage {name}: {e}")))?;
        let mut buf = Vec::with_capacity(entry.size().min(file_len) as usize);
        entry
            .by_ref()
            .take(file_len.saturating_mul(64))
            .read_to_end(&mut buf)
            .map_err(|e| msg(path, e))?;
        Ok(buf)
    };
    convert(obj, &mut storage, path)
}

fn load_legacy(path: &Path) -> Result<Value> {
    let file = std::fs::File::open(path).map_err(|e| msg(path, e))?;
    let file_len = file.metadata().map_err(|e| msg(path, e))?.len();
    let mut r = BufReader::new(file);
    let mut skip = [0u8; 15];
    r.read_exact(&mut skip).map_err(|e| msg(path, e))?;
    let _protocol = read_pickle(&mut r, path)?;
    let _sys_info = read_pickle(&mut r, path)?;
    let obj = read_pickle(&mut r, path)?;
    // The storages follow, in the order of the pickled key list, each as an 8-byte element
    // count and the raw little-endian data; sizes come from the storages' persistent ids.
    let keys = match read_pickle(&mut r, path)? {
        Object::List(k) => k
            .into_iter()
            .map(|k| match k {
                Object::Unicode(s) => Ok(s),
                o => Err(msg(path, format!("storage key {o:?}"))),
            })
            .collect::<Result<Vec<_>>>()?,
        o => {
            return Err(msg(
                path,
                format!("expected the storage key list, got {o:?}"),
            ))
        }
    };
    let mut sizes = HashMap::new();
    collect_storage_sizes(&obj, &mut sizes);
    let mut data = HashMap::new();
    for k in keys {
        let mut n = [0u8; 8];
        r.read_exact(&mut n)
            .map_err(|e| msg(path, format!("storage {k}: {e} (truncated file?)")))?;
        let numel = u64::from_le_bytes(n) as usize;
        let elem = sizes
            .get(&k)
            .copied()
            .ok_or_else(|| msg(path, format!("storage {k} is not referenced by any tensor")))?;
        // The declared size must fit in what is left of the file (a damaged count would
        // otherwise be a multi-GiB allocation).
        let left = file_len.saturating_sub(r.stream_position().map_err(|e| msg(path, e))?);
        let bytes = (numel as u64)
            .checked_mul(elem as u64)
            .filter(|b| *b <= left)
            .ok_or_else(|| {
                msg(
                    path,
                    format!(
                        "storage {k} claims {numel} elements of {elem} bytes, more than the \
                         {left} bytes left in the file (truncated or damaged)"
                    ),
                )
            })?;
        let mut buf = vec![0u8; bytes as usize];
        r.read_exact(&mut buf)
            .map_err(|e| msg(path, format!("storage {k}: {e} (truncated file?)")))?;
        data.insert(k, buf);
    }
    let mut storage = |key: &str| -> Result<Vec<u8>> {
        data.get(key)
            .cloned()
            .ok_or_else(|| msg(path, format!("missing storage {key}")))
    };
    convert(obj, &mut storage, path)
}

/// Element sizes of the storages named in persistent ids.
fn collect_storage_sizes(o: &Object, out: &mut HashMap<String, usize>) {
    match o {
        Object::PersistentLoad(id) => {
            if let Object::Tuple(t) = id.as_ref() {
                if let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(k))) =
                    (t.get(1), t.get(2))
                {
                    if let Some((_, size)) = storage_dtype(class_name) {
                        out.insert(k.clone(), size);
                    }
                }
            }
        }
        Object::Tuple(v) | Object::List(v) => v.iter().for_each(|x| collect_storage_sizes(x, out)),
        Object::Dict(d) => d.iter().for_each(|(k, v)| {
            collect_storage_sizes(k, out);
            collect_storage_sizes(v, out)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            collect_storage_sizes(callable, out);
            collect_storage_sizes(args, out)
        }
        _ => {}
    }
}

/// The dtype to load a storage class as (None: kept as raw `Other`), and its element size.
fn storage_dtype(class: &str) -> Option<(Option<DType>, usize)> {
    Some(match class {
        "FloatStorage" => (Some(DType::F32), 4),
        "HalfStorage" => (Some(DType::F16), 2),
        "BFloat16Storage" => (Some(DType::BF16), 2),
        "DoubleStorage" => (Some(DType::F64), 8),
        "LongStorage" => (Some(DType::I64), 8),
        "IntStorage" => (Some(DType::I32), 4),
        "ShortStorage" => (Some(DType::I16), 2),
        "ByteStorage" => (Some(DType::U8), 1),
        "CharStorage" | "BoolStorage" => (None, 1),
        _ => return None,
    })
}

/// Python pickles a dict's items in SETITEMS batches of 1000 and candle's reader appends each
/// batch reversed; undo that so dicts keep their insertion order (DeepSpeed's `param_shapes`
/// order is the flat buffer's).
fn insertion_order(mut d: Vec<(Object, Object)>) -> Vec<(Object, Object)> {
    for chunk in d.chunks_mut(1000) {
        chunk.reverse();
    }
    d
}

fn key_string(k: Object) -> String {
    match k {
        Object::Unicode(s) => s,
        Object::Int(i) => i.to_string(),
        Object::Long(i) => i.to_string(),
        o => format!("{o:?}"),
    }
}

fn ints(o: Object, what: &str, path: &Path) -> Result<Vec<usize>> {
    match o {
        Object::Tuple(v) => v
            .into_iter()
            .map(|x| match x {
                Object::Int(i) if i >= 0 => Ok(i as usize),
                Object::Long(i) if i >= 0 => Ok(i as usize),
                o => Err(msg(path, format!("tensor {what}: {o:?}"))),
            })
            .collect(),
        o => Err(msg(path, format!("tensor {what}: {o:?}"))),
    }
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
fn rebuild_tensor(
    args: Object,
    storage: &mut dyn FnMut(&str) -> Result<Vec<u8>>,
    path: &Path,
) -> Result<Value> {
    let Object::Tuple(mut a) = args else {
        return Err(msg(path, "tensor arguments are not a tuple"));
    };
    if a.len() < 4 {
        return Err(msg(path, "tensor arguments too short"));
    }
    let stride = ints(a.remove(3), "stride", path)?;
    let size = ints(a.remove(2), "size", path)?;
    let offset = match a.remove(1) {
        Object::Int(i) => i as usize,
        Object::Long(i) => i as usize,
        o => return Err(msg(path, format!("tensor offset {o:?}"))),
    };
    let Object::PersistentLoad(id) = a.remove(0) else {
        return Err(msg(path, "tensor storage is not a persistent id"));
    };
    let Object::Tuple(id) = *id else {
        return Err(msg(path, "storage id is not a tuple"));
    };
    let (class, key) = match (id.get(1), id.get(2)) {
        (Some(Object::Class { class_name, .. }), Some(Object::Unicode(k))) => {
            (class_name.clone(), k.clone())
        }
        _ => return Err(msg(path, format!("storage id {id:?}"))),
    };
    let Some((Some(dtype), elem)) = storage_dtype(&class) else {
        return Ok(Value::Other(format!("tensor of {class}")));
    };
    let bytes = storage(&key)?;
    let numel: usize = size.iter().product();
    let contiguous = {
        let mut expect = 1;
        let mut ok = true;
        for (d, s) in size.iter().zip(&stride).rev() {
            if *d > 1 && *s != expect {
                ok = false;
            }
            expect *= d;
        }
        ok
    };
    let data: Vec<u8> = if contiguous {
        let (from, to) = (offset * elem, (offset + numel) * elem);
        if to > bytes.len() {
            return Err(msg(
                path,
                format!(
                    "storage {key} holds {} bytes, tensor needs {to}",
                    bytes.len()
                ),
            ));
        }
        bytes[from..to].to_vec()
    } else {
        // Strided view: gather element by element.
        let mut out = Vec::with_capacity(numel * elem);
        let mut idx = vec![0usize; size.len()];
        for _ in 0..numel {
            let at = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
            let b = bytes
                .get(at * elem..(at + 1) * elem)
                .ok_or_else(|| msg(path, format!("storage {key}: view out of range")))?;
            out.extend_from_slice(b);
            for d in (0..size.len()).rev() {
                idx[d] += 1;
                if idx[d] < size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    };
    let t = Tensor::from_raw_buffer(&data, dtype, &size, &Device::Cpu)?;
    Ok(Value::Tensor(t))
}

fn class_of(o: &Object) -> Option<(&str, &str)> {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => Some((module_name, class_name)),
        _ => None,
    }
}

fn convert(
    o: Object,
    storage: &mut dyn FnMut(&str) -> Result<Vec<u8>>,
    path: &Path,
) -> Result<Value> {
    Ok(match o {
        Object::None => Value::None,
        Object::Bool(b) => Value::Bool(b),
        Object::Int(i) => Value::Int(i as i64),
        Object::Long(i) => Value::Int(i),
        Object::Float(f) => Value::Float(f),
        Object::Unicode(s) => Value::Str(s),
        Object::Tuple(v) | Object::List(v) => Value::List(
            v.into_iter()
                .map(|x| convert(x, storage, path))
                .collect::<Result<_>>()?,
        ),
        Object::Dict(d) => Value::Dict(
            insertion_order(d)
                .into_iter()
                .map(|(k, v)| Ok((key_string(k), convert(v, storage, path)?)))
                .collect::<Result<_>>()?,
        ),
        Object::Reduce { callable, args } => match class_of(&callable) {
            Some(("torch._utils", "_rebuild_tensor_v2"))
            | Some(("torch._utils", "_rebuild_tensor")) => rebuild_tensor(*args, storage, path)?,
            Some(("torch._utils", "_rebuild_parameter")) => {
                // (tensor, requires_grad, hooks): the tensor.
                match *args {
                    Object::Tuple(mut a) if !a.is_empty() => convert(a.remove(0), storage, path)?,
                    o => Value::Other(format!("parameter {o:?}")),
                }
            }
            Some(("torch", "Size")) => match *args {
                Object::Tuple(mut a) if !a.is_empty() => convert(a.remove(0), storage, path)?,
                o => Value::Other(format!("torch.Size {o:?}")),
            },
            Some((m, c)) => Value::Other(format!("{m}.{c}")),
            None => Value::Other("reduce".into()),
        },
        // An object with state: a dict state (argparse.Namespace) reads as that dict.
        Object::Build { callable, args } => match (*callable, *args) {
            (_, Object::Dict(d)) => convert(Object::Dict(d), storage, path)?,
            (Object::Reduce { callable, args }, _) => {
                convert(Object::Reduce { callable, args }, storage, path)?
            }
            (c, _) => Value::Other(format!("{c:?}")),
        },
        o => Value::Other(format!("{o:?}")),
    })
}
