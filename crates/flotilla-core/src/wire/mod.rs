//! Messages between the server half and the client half of a method, and their encoding.
//!
//! The messages are protobuf (schema in `proto/flotilla.proto`, derived here with `prost`),
//! so the simulator measures exactly the bytes the network driver sends: the size of a
//! message is `prost::Message::encoded_len`. Tensors travel as name + shape + dtype + encoded
//! bytes; the encodings are:
//! - dense: every value, f32 little-endian;
//! - masked: only the values at the active positions of a named [`Mask`], in ascending index
//!   order (the mask itself travels separately, and only when the receiver lacks it);
//! - held: no values; the receiver already holds this tensor under the same name and
//!   [`fingerprint`] (sent earlier with its fingerprint set, and kept).

use crate::{CoreError, Tensor};
use std::collections::HashMap;

mod mask;
pub use mask::Mask;

/// Longest name or label a peer may send (tensor, mask, metric, client or tier name), bytes.
pub const MAX_LABEL_BYTES: usize = 256;

/// Checks a string that a peer sent and that may reach logs, files or error messages: at most
/// [`MAX_LABEL_BYTES`] bytes and no control characters (a newline would forge log lines).
/// `what` names the field in the error.
pub fn check_label(what: &str, value: &str) -> Result<(), CoreError> {
    if value.len() > MAX_LABEL_BYTES {
        return Err(CoreError::InvalidMessage(format!(
            "{what} is {} bytes long; at most {MAX_LABEL_BYTES} are accepted",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(CoreError::InvalidMessage(format!(
            "{what} {:?} contains control characters (newlines, escapes); use printable text",
            value.escape_debug().to_string()
        )));
    }
    Ok(())
}

/// Version of the message schema; peers with another version are refused.
pub const PROTOCOL_VERSION: u32 = 2;

/// Upper bound on the values of one tensor accepted from the wire (1 Gi values, 4 GiB).
pub const MAX_TENSOR_VALUES: u64 = 1 << 30;

/// Value encoding of a tensor on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Encoding {
    /// All values, f32 little-endian.
    Dense = 0,
    /// Values at the active positions of a mask, f32 little-endian.
    Masked = 1,
    /// No values: the tensor the receiver holds under this name and `fingerprint`.
    Held = 2,
}

/// Element type of a tensor on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DType {
    /// 32-bit IEEE float.
    F32 = 0,
}

/// A tensor on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorMsg {
    /// PyTorch-style name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Dimensions.
    #[prost(uint64, repeated, tag = "2")]
    pub shape: Vec<u64>,
    /// Element type.
    #[prost(enumeration = "DType", tag = "3")]
    pub dtype: i32,
    /// Value encoding.
    #[prost(enumeration = "Encoding", tag = "4")]
    pub encoding: i32,
    /// Encoded values.
    #[prost(bytes = "vec", tag = "5")]
    pub data: Vec<u8>,
    /// For masked tensors: the name of the mask giving the active positions.
    #[prost(string, tag = "6")]
    pub mask: String,
    /// [`fingerprint`] of the tensor, for a tensor the receiver keeps (then it checks the
    /// values it decoded against it) and for a held one (then it names what is meant); 0
    /// otherwise.
    #[prost(fixed64, tag = "7")]
    pub fingerprint: u64,
}

/// Encoding of a mask on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MaskEncoding {
    /// One bit per position, least significant bit first.
    Bitmap = 0,
    /// Gaps between consecutive active indices as LEB128 varints.
    DeltaIndices = 1,
}

/// A binary mask on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MaskMsg {
    /// Mask name (usually the name of the tensor it applies to).
    #[prost(string, tag = "1")]
    pub name: String,
    /// Number of positions.
    #[prost(uint64, tag = "2")]
    pub len: u64,
    /// How `data` is encoded.
    #[prost(enumeration = "MaskEncoding", tag = "3")]
    pub encoding: i32,
    /// Encoded mask.
    #[prost(bytes = "vec", tag = "4")]
    pub data: Vec<u8>,
}

/// Server → client: one task of one phase of a round.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskMsg {
    /// [`PROTOCOL_VERSION`] of the sender.
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    /// Round number, from 1.
    #[prost(uint64, tag = "2")]
    pub round: u64,
    /// Phase within the round, from 0.
    #[prost(uint32, tag = "3")]
    pub phase: u32,
    /// Client the task is for.
    #[prost(uint64, tag = "4")]
    pub client: u64,
    /// What to do, interpreted by the method's client half (e.g. `train`).
    #[prost(string, tag = "5")]
    pub kind: String,
    /// Model architecture and view, JSON.
    #[prost(string, tag = "6")]
    pub model_json: String,
    /// Local training recipe, JSON.
    #[prost(string, tag = "7")]
    pub recipe_json: String,
    /// Tensors sent to the client.
    #[prost(message, repeated, tag = "8")]
    pub tensors: Vec<TensorMsg>,
    /// Masks the client does not hold yet.
    #[prost(message, repeated, tag = "9")]
    pub masks: Vec<MaskMsg>,
    /// Method-specific options, JSON.
    #[prost(string, tag = "10")]
    pub options_json: String,
}

/// Resources a client measured while executing a task.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceMsg {
    /// Heap high-water mark during the task, measured by the counting allocator.
    #[prost(uint64, tag = "1")]
    pub peak_memory_bytes: u64,
    /// Analytic memory estimate of the task.
    #[prost(uint64, tag = "2")]
    pub estimated_memory_bytes: u64,
    /// Training FLOPs from the per-layer formulas.
    #[prost(double, tag = "3")]
    pub flops: f64,
    /// Wall time of the task on the client.
    #[prost(double, tag = "4")]
    pub wall_time_s: f64,
}

/// Client → server: the reply to one task.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReplyMsg {
    /// [`PROTOCOL_VERSION`] of the sender.
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    /// Round of the task.
    #[prost(uint64, tag = "2")]
    pub round: u64,
    /// Phase of the task.
    #[prost(uint32, tag = "3")]
    pub phase: u32,
    /// Replying client.
    #[prost(uint64, tag = "4")]
    pub client: u64,
    /// Local examples used (the aggregation weight of FedAvg-style rules).
    #[prost(uint64, tag = "5")]
    pub num_examples: u64,
    /// Tensors sent back.
    #[prost(message, repeated, tag = "6")]
    pub tensors: Vec<TensorMsg>,
    /// Scalar metrics (e.g. `train_loss`).
    #[prost(map = "string, double", tag = "7")]
    pub metrics: HashMap<String, f64>,
    /// Measured resources.
    #[prost(message, optional, tag = "8")]
    pub resources: Option<ResourceMsg>,
}

fn f32s_to_bytes<'a>(values: impl Iterator<Item = &'a f32>) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.size_hint().0 * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// All values of a slice as little-endian bytes, in one copy (the hot path of dense tensors).
fn f32_slice_to_bytes(values: &[f32]) -> Vec<u8> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and any byte pattern is a valid u8; on a little-endian
        // target the in-memory bytes are exactly the little-endian wire bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), values.len() * 4) };
        bytes.to_vec()
    }
    #[cfg(not(target_endian = "little"))]
    {
        f32s_to_bytes(values.iter())
    }
}

/// Little-endian bytes (length checked by the caller) as f32 values, in one copy.
fn bytes_to_f32s(bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / 4];
    #[cfg(target_endian = "little")]
    {
        // SAFETY: `out` holds exactly bytes.len() / 4 f32 values, i.e. the same number of
        // bytes as `bytes` (a multiple of 4, checked by the caller); every bit pattern is a
        // valid f32; on a little-endian target the wire bytes are the in-memory bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                out.as_mut_ptr().cast::<u8>(),
                out.len() * 4,
            )
        };
    }
    #[cfg(not(target_endian = "little"))]
    for (dst, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *dst = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    out
}

/// Encodes a tensor with every value.
pub fn encode_dense(t: &Tensor) -> TensorMsg {
    TensorMsg {
        name: t.name.clone(),
        shape: t.shape.iter().map(|d| *d as u64).collect(),
        dtype: DType::F32 as i32,
        encoding: Encoding::Dense as i32,
        data: f32_slice_to_bytes(&t.data),
        mask: String::new(),
        fingerprint: 0,
    }
}

/// A reference to a tensor the receiver holds: name, shape and fingerprint, no values.
pub fn encode_held(t: &Tensor, fingerprint: u64) -> TensorMsg {
    TensorMsg {
        name: t.name.clone(),
        shape: t.shape.iter().map(|d| *d as u64).collect(),
        dtype: DType::F32 as i32,
        encoding: Encoding::Held as i32,
        data: Vec::new(),
        mask: String::new(),
        fingerprint,
    }
}

/// A stable 64-bit fingerprint of a tensor's name, shape and values (XXH3 over their bytes):
/// equal tensors have equal fingerprints on every machine and in every version of this
/// protocol, so a receiver can be told "the tensor you hold under this fingerprint".
pub fn fingerprint(t: &Tensor) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(t.name.len() as u64).to_le_bytes());
    h.update(t.name.as_bytes());
    h.update(&(t.shape.len() as u64).to_le_bytes());
    for d in &t.shape {
        h.update(&(*d as u64).to_le_bytes());
    }
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding; the in-memory bytes are the little-endian bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(t.data.as_ptr().cast::<u8>(), t.data.len() * 4) };
        h.update(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    for v in &t.data {
        h.update(&v.to_le_bytes());
    }
    h.digest()
}

/// Encodes only the values of `t` at the active positions of `mask`.
pub fn encode_masked(t: &Tensor, mask: &Mask) -> Result<TensorMsg, CoreError> {
    if mask.active.len() != t.numel() {
        return Err(CoreError::Incompatible(format!(
            "mask `{}` has {} positions, tensor `{}` has {} values",
            mask.name,
            mask.active.len(),
            t.name,
            t.numel()
        )));
    }
    let values = t
        .data
        .iter()
        .zip(&mask.active)
        .filter(|(_, a)| **a)
        .map(|(v, _)| v);
    Ok(TensorMsg {
        name: t.name.clone(),
        shape: t.shape.iter().map(|d| *d as u64).collect(),
        dtype: DType::F32 as i32,
        encoding: Encoding::Masked as i32,
        data: f32s_to_bytes(values),
        mask: mask.name.clone(),
        fingerprint: 0,
    })
}

/// Decodes and validates a tensor; masked tensors look their mask up in `masks`, and their
/// inactive positions decode as zero.
pub fn decode_tensor(msg: &TensorMsg, masks: &HashMap<String, Mask>) -> Result<Tensor, CoreError> {
    check_label("tensor name", &msg.name)?;
    let bad = |what: String| CoreError::InvalidMessage(format!("tensor `{}`: {what}", msg.name));
    if DType::try_from(msg.dtype) != Ok(DType::F32) {
        return Err(bad(format!("unsupported dtype {}", msg.dtype)));
    }
    let mut numel: u64 = 1;
    for d in &msg.shape {
        numel = numel
            .checked_mul(*d)
            .filter(|n| *n <= MAX_TENSOR_VALUES)
            .ok_or_else(|| bad(format!("shape {:?} is too large", msg.shape)))?;
    }
    let numel = numel as usize;
    let shape: Vec<usize> = msg.shape.iter().map(|d| *d as usize).collect();
    let read = |bytes: &[u8], n: usize| -> Result<Vec<f32>, CoreError> {
        if bytes.len() != n * 4 {
            return Err(bad(format!(
                "{} bytes of data for {n} f32 values",
                bytes.len()
            )));
        }
        Ok(bytes_to_f32s(bytes))
    };
    let data = match Encoding::try_from(msg.encoding) {
        Ok(Encoding::Dense) => read(&msg.data, numel)?,
        Ok(Encoding::Masked) => {
            let mask = masks
                .get(&msg.mask)
                .ok_or_else(|| bad(format!("refers to unknown mask `{}`", msg.mask)))?;
            if mask.active.len() != numel {
                return Err(bad(format!(
                    "mask `{}` has {} positions for {numel} values",
                    mask.name,
                    mask.active.len()
                )));
            }
            let values = read(&msg.data, mask.count_active())?;
            let mut it = values.into_iter();
            mask.active
                .iter()
                .map(|a| if *a { it.next().unwrap_or(0.0) } else { 0.0 })
                .collect()
        }
        Ok(Encoding::Held) => {
            return Err(bad(
                "names a tensor held from an earlier task; only a task may send that".into(),
            ));
        }
        Err(_) => return Err(bad(format!("unknown encoding {}", msg.encoding))),
    };
    let t = Tensor::new(msg.name.clone(), shape, data)?;
    if msg.fingerprint != 0 && fingerprint(&t) != msg.fingerprint {
        return Err(bad(
            "its values do not match the fingerprint sent with them (corrupted in transit)".into(),
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn dense_round_trip_is_exact_and_overhead_small() {
        let data: Vec<f32> = (0..10_000).map(|i| (i as f32).sin()).collect();
        let t = Tensor::new("fc.weight", vec![100, 100], data).unwrap();
        let msg = encode_dense(&t);
        let back = decode_tensor(&msg, &HashMap::new()).unwrap();
        assert_eq!(back, t);
        let wire = msg.encoded_len();
        assert!((40_000..40_100).contains(&wire), "wire {wire}");
    }

    #[test]
    fn masked_sends_only_active_values() {
        let t = Tensor::new("w", vec![2, 4], vec![1., 2., 3., 4., 5., 6., 7., 8.]).unwrap();
        let mask = Mask {
            name: "w".into(),
            active: vec![true, false, false, true, false, false, false, true],
        };
        let msg = encode_masked(&t, &mask).unwrap();
        assert_eq!(msg.data.len(), 3 * 4);
        let masks = HashMap::from([("w".to_string(), mask)]);
        let back = decode_tensor(&msg, &masks).unwrap();
        assert_eq!(back.data, vec![1., 0., 0., 4., 0., 0., 0., 8.]);
        // unknown mask is an error, not a panic
        assert!(decode_tensor(&msg, &HashMap::new()).is_err());
    }

    #[test]
    fn malformed_tensors_are_errors() {
        let t = Tensor::new("w", vec![3], vec![1., 2., 3.]).unwrap();
        let mut msg = encode_dense(&t);
        msg.data.pop();
        assert!(decode_tensor(&msg, &HashMap::new()).is_err());
        let mut msg = encode_dense(&t);
        msg.shape = vec![u64::MAX, 2];
        assert!(decode_tensor(&msg, &HashMap::new()).is_err());
        let mut msg = encode_dense(&t);
        msg.dtype = 7;
        assert!(decode_tensor(&msg, &HashMap::new()).is_err());
        let bad_mask = MaskMsg {
            name: "m".into(),
            len: 4,
            encoding: MaskEncoding::DeltaIndices as i32,
            data: vec![0x80, 0x80],
        };
        assert!(Mask::decode(&bad_mask).is_err());
        let out_of_range = MaskMsg {
            name: "m".into(),
            len: 4,
            encoding: MaskEncoding::DeltaIndices as i32,
            data: vec![9],
        };
        assert!(Mask::decode(&out_of_range).is_err());
    }

    #[test]
    fn truncated_protobuf_is_an_error() {
        let t = Tensor::new("w", vec![3], vec![1., 2., 3.]).unwrap();
        let reply = ReplyMsg {
            protocol_version: PROTOCOL_VERSION,
            round: 1,
            tensors: vec![encode_dense(&t)],
            ..Default::default()
        };
        let bytes = reply.encode_to_vec();
        assert!(ReplyMsg::decode(&bytes[..bytes.len() - 3]).is_err());
        assert_eq!(ReplyMsg::decode(bytes.as_slice()).unwrap(), reply);
    }
}
