//! Parameter collections as safetensors files (PyTorch names and layouts), written atomically.

use crate::{CoreError, ParamSet, Tensor};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Header key holding the canonical tensor order (safetensors itself sorts tensors by name).
const ORDER_KEY: &str = "flotilla.order";

/// Serialises a collection to safetensors bytes (f32 little-endian). `metadata` is stored in
/// the header (e.g. the model spec), with the canonical tensor order.
pub fn to_bytes(
    params: &ParamSet,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, CoreError> {
    let mut metadata = metadata.unwrap_or_default();
    metadata.insert(
        ORDER_KEY.into(),
        params.names().collect::<Vec<_>>().join("\n"),
    );
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> = params
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views = raw
        .iter()
        .map(|(name, bytes, shape)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| CoreError::Incompatible(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| CoreError::Incompatible(e.to_string()))?;
    Ok(canonical_header(bytes))
}

/// Rewrites the JSON header with sorted keys: the library writes metadata in hash order, and
/// the same model must give the same bytes. The header stays padded to 8 bytes.
fn canonical_header(bytes: Vec<u8>) -> Vec<u8> {
    use std::collections::BTreeMap;
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + len) else {
        return bytes;
    };
    let Ok(map) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else {
        return bytes;
    };
    // Build the JSON by hand from sorted maps so the order holds whatever serde_json's
    // map type is.
    let mut json = String::from("{");
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&serde_json::to_string(key).expect("string"));
        json.push(':');
        match serde_json::from_value::<BTreeMap<String, serde_json::Value>>(value.clone()) {
            Ok(inner) => {
                json.push('{');
                for (j, (k, v)) in inner.iter().enumerate() {
                    if j > 0 {
                        json.push(',');
                    }
                    json.push_str(&serde_json::to_string(k).expect("string"));
                    json.push(':');
                    json.push_str(&serde_json::to_string(v).expect("value"));
                }
                json.push('}');
            }
            Err(_) => json.push_str(&serde_json::to_string(value).expect("value")),
        }
    }
    json.push('}');
    let mut json = json.into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(bytes.len() + 8);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + len..]);
    out
}

/// Parses safetensors bytes. Tensors come back in the canonical order recorded by
/// [`to_bytes`], or, for files written elsewhere, in the order of their offsets.
pub fn from_bytes(bytes: &[u8]) -> Result<(ParamSet, HashMap<String, String>), CoreError> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| CoreError::InvalidMessage(e.to_string()))?;
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| CoreError::InvalidMessage(e.to_string()))?;
    let mut named: Vec<(usize, Tensor)> = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(CoreError::InvalidMessage(format!(
                "tensor `{name}` has dtype {:?}; flotilla reads f32 tensors only",
                view.dtype()
            )));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let offset = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        named.push((offset, Tensor::new(name, view.shape().to_vec(), data)?));
    }
    let mut metadata = meta.metadata().clone().unwrap_or_default();
    let order = metadata.remove(ORDER_KEY);
    match order {
        Some(order) => {
            let rank: HashMap<&str, usize> =
                order.split('\n').enumerate().map(|(i, n)| (n, i)).collect();
            named.sort_by_key(|(o, t)| {
                (rank.get(t.name.as_str()).copied().unwrap_or(usize::MAX), *o)
            });
        }
        None => named.sort_by_key(|(o, _)| *o),
    }
    let params = ParamSet::from_tensors(named.into_iter().map(|(_, t)| t).collect())?;
    Ok((params, metadata))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CoreError> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| CoreError::io(&tmp, e))?;
    f.sync_all().map_err(|e| CoreError::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| CoreError::io(path, e))
}

/// Saves a collection as a safetensors file, atomically.
pub fn save(
    path: &Path,
    params: &ParamSet,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CoreError> {
    write_atomic(path, &to_bytes(params, metadata)?)
}

/// Loads a collection from a safetensors file; errors name the file.
pub fn load(path: &Path) -> Result<(ParamSet, HashMap<String, String>), CoreError> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::File {
        path: path.into(),
        message: format!("cannot read the model file: {e}"),
    })?;
    from_bytes(&bytes).map_err(|e| CoreError::File {
        path: path.into(),
        message: format!("not a valid f32 safetensors file ({e}); was it truncated?"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_bit_identical_and_keeps_order() {
        let p = ParamSet::from_tensors(vec![
            Tensor::new(
                "z.weight",
                vec![2, 3],
                vec![1.5, -0.0, f32::MIN_POSITIVE, 3.0, 4.0, 5.0],
            )
            .unwrap(),
            Tensor::new("a.bias", vec![2], vec![7.0, 8.0]).unwrap(),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let meta = HashMap::from([("model".to_string(), "{}".to_string())]);
        save(&path, &p, Some(meta.clone())).unwrap();
        let (back, m) = load(&path).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            back.get("z.weight").unwrap().data[1].to_bits(),
            (-0.0f32).to_bits()
        );
        assert_eq!(m, meta);
    }

    #[test]
    fn same_content_gives_same_bytes() {
        let p = ParamSet::from_tensors(vec![Tensor::new("w", vec![2], vec![1.0, 2.0]).unwrap()])
            .unwrap();
        let meta = || {
            Some(HashMap::from([
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string()),
                ("c".to_string(), "3".to_string()),
            ]))
        };
        let first = to_bytes(&p, meta()).unwrap();
        for _ in 0..20 {
            assert_eq!(to_bytes(&p, meta()).unwrap(), first);
        }
        let (back, m) = from_bytes(&first).unwrap();
        assert_eq!(back, p);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let p =
            ParamSet::from_tensors(vec![Tensor::new("w", vec![4], vec![1.0; 4]).unwrap()]).unwrap();
        let bytes = to_bytes(&p, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("m.safetensors") && err.contains("truncated"),
            "{err}"
        );
    }
}
