//! Masks on the wire: a bitmap or delta-coded indices, whichever is smaller.

use super::{MAX_TENSOR_VALUES, MaskEncoding, MaskMsg, check_label};
use crate::CoreError;

/// A binary mask over the values of one tensor (true = active).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mask {
    /// Mask name.
    pub name: String,
    /// One flag per position.
    pub active: Vec<bool>,
}

impl Mask {
    /// A mask with every position active.
    pub fn full(name: impl Into<String>, len: usize) -> Self {
        Self {
            name: name.into(),
            active: vec![true; len],
        }
    }

    /// A stable 64-bit fingerprint of the name and the active positions (XXH3), so that a
    /// sender can keep what a receiver holds without keeping a copy.
    pub fn fingerprint(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&(self.name.len() as u64).to_le_bytes());
        h.update(self.name.as_bytes());
        h.update(&(self.active.len() as u64).to_le_bytes());
        h.update(&encode_bitmap(&self.active));
        h.digest()
    }

    /// Number of active positions.
    pub fn count_active(&self) -> usize {
        self.active.iter().filter(|a| **a).count()
    }

    /// Encodes as bitmap or delta indices, whichever is smaller.
    pub fn encode(&self) -> MaskMsg {
        let bitmap = encode_bitmap(&self.active);
        let delta = encode_delta(&self.active);
        let (encoding, data) = if delta.len() < bitmap.len() {
            (MaskEncoding::DeltaIndices, delta)
        } else {
            (MaskEncoding::Bitmap, bitmap)
        };
        MaskMsg {
            name: self.name.clone(),
            len: self.active.len() as u64,
            encoding: encoding as i32,
            data,
        }
    }

    /// Decodes and validates a mask from the wire.
    pub fn decode(msg: &MaskMsg) -> Result<Mask, CoreError> {
        check_label("mask name", &msg.name)?;
        if msg.len > MAX_TENSOR_VALUES {
            return Err(CoreError::InvalidMessage(format!(
                "mask `{}` claims {} positions, over the limit of {MAX_TENSOR_VALUES}",
                msg.name, msg.len
            )));
        }
        let len = msg.len as usize;
        let active = match MaskEncoding::try_from(msg.encoding) {
            Ok(MaskEncoding::Bitmap) => {
                if msg.data.len() != len.div_ceil(8) {
                    return Err(CoreError::InvalidMessage(format!(
                        "mask `{}`: bitmap of {} bytes for {len} positions",
                        msg.name,
                        msg.data.len()
                    )));
                }
                (0..len)
                    .map(|i| msg.data[i / 8] >> (i % 8) & 1 == 1)
                    .collect()
            }
            Ok(MaskEncoding::DeltaIndices) => decode_delta(&msg.data, len)
                .map_err(|e| CoreError::InvalidMessage(format!("mask `{}`: {e}", msg.name)))?,
            Err(_) => {
                return Err(CoreError::InvalidMessage(format!(
                    "mask `{}`: unknown encoding {}",
                    msg.name, msg.encoding
                )));
            }
        };
        Ok(Mask {
            name: msg.name.clone(),
            active,
        })
    }
}

fn encode_bitmap(active: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; active.len().div_ceil(8)];
    for (i, a) in active.iter().enumerate() {
        if *a {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

fn encode_delta(active: &[bool]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = 0usize;
    let mut first = true;
    for (i, a) in active.iter().enumerate() {
        if *a {
            // First index is absolute, the rest are gaps minus one (gaps are >= 1).
            let gap = if first { i } else { i - prev - 1 };
            first = false;
            prev = i;
            let mut v = gap as u64;
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(byte);
                    break;
                }
                out.push(byte | 0x80);
            }
        }
    }
    out
}

fn decode_delta(data: &[u8], len: usize) -> Result<Vec<bool>, String> {
    let mut active = vec![false; len];
    let mut pos = 0usize;
    let mut next: Option<usize> = None;
    while pos < data.len() {
        let mut v: u64 = 0;
        let mut shift = 0;
        loop {
            let byte = *data.get(pos).ok_or("truncated varint")?;
            pos += 1;
            if shift >= 63 {
                return Err("varint too long".into());
            }
            v |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let idx = match next {
            None => v as usize,
            Some(n) => n.checked_add(v as usize).ok_or("index overflow")?,
        };
        if idx >= len {
            return Err(format!("index {idx} out of range for {len} positions"));
        }
        active[idx] = true;
        next = Some(idx + 1);
    }
    Ok(active)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_picks_smaller_encoding_and_round_trips() {
        let mut sparse = Mask::full("m", 10_000);
        sparse
            .active
            .iter_mut()
            .enumerate()
            .for_each(|(i, a)| *a = i % 97 == 0);
        let enc = sparse.encode();
        assert_eq!(enc.encoding, MaskEncoding::DeltaIndices as i32);
        assert_eq!(Mask::decode(&enc).unwrap(), sparse);
        let mut dense = Mask::full("m", 10_001);
        dense.active[17] = false;
        let enc = dense.encode();
        assert_eq!(enc.encoding, MaskEncoding::Bitmap as i32);
        assert_eq!(enc.data.len(), 1251);
        assert_eq!(Mask::decode(&enc).unwrap(), dense);
    }
}
