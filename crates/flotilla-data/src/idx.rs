//! IDX files (the MNIST / Fashion-MNIST format), raw or gzip-compressed.

use std::io::Read;
use std::path::Path;

use crate::DataError;

/// Magic number of an IDX file of unsigned bytes with three dimensions (images).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with one dimension (labels).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Fix text for files read outside a known dataset.
const GENERIC_CORRUPT_FIX: &str =
    "the file is corrupt, reinstall it (replace it with a fresh copy)";
const GENERIC_MISSING_FIX: &str = "check the path, or pass --data-dir / set FLOTILLA_DATA";

/// Gzip streams are decoded up to this many bytes; the largest real file
/// (MNIST train images) is about 47 MB, so anything near this is damaged.
const MAX_DECOMPRESSED: u64 = 1 << 31;

/// The contents of an IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimension sizes from the header, outermost first.
    pub dims: Vec<usize>,
    /// The elements in row-major order; `data.len()` is the product of `dims`.
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes (any number of dimensions), raw or gzip-compressed.
///
/// Compression is detected from the gzip magic bytes, not the file name.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let bytes = read_maybe_gz(path, GENERIC_MISSING_FIX, GENERIC_CORRUPT_FIX)?;
    parse_idx(path, bytes, None, GENERIC_CORRUPT_FIX)
}

/// Reads a whole file, decompressing it if it starts with the gzip magic bytes.
pub(crate) fn read_maybe_gz(
    path: &Path,
    missing_fix: &str,
    corrupt_fix: &str,
) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound {
                path: path.to_path_buf(),
                also_tried: Vec::new(),
                fix: missing_fix.to_string(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source: e,
                fix: "check that it is a readable file, or pass --data-dir / set FLOTILLA_DATA"
                    .to_string(),
            }
        }
    })?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4));
    let mut dec = flate2::read::MultiGzDecoder::new(&raw[..]).take(MAX_DECOMPRESSED + 1);
    dec.read_to_end(&mut out).map_err(|e| {
        DataError::corrupt(
            path,
            format!("is gzip-compressed but could not be decompressed ({e})"),
            corrupt_fix,
        )
    })?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(DataError::corrupt(
            path,
            format!("decompresses to more than {MAX_DECOMPRESSED} bytes"),
            corrupt_fix,
        ));
    }
    Ok(out)
}

/// Parses IDX bytes. `expect_magic`, when given, is the exact magic number required.
pub(crate) fn parse_idx(
    path: &Path,
    mut bytes: Vec<u8>,
    expect_magic: Option<u32>,
    fix: &str,
) -> Result<IdxArray, DataError> {
    if bytes.len() < 4 {
        return Err(DataError::corrupt(
            path,
            format!(
                "is truncated: {} bytes is too short for an IDX header",
                bytes.len()
            ),
            fix,
        ));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    match expect_magic {
        Some(want) if magic != want => {
            return Err(DataError::corrupt(
                path,
                format!(
                    "has magic number 0x{magic:08x} but {} must start with 0x{want:08x}",
                    describe_magic(want)
                ),
                fix,
            ));
        }
        _ => {}
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[3] == 0 {
        return Err(DataError::corrupt(
            path,
            format!("is not an IDX file (magic number 0x{magic:08x})"),
            fix,
        ));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::corrupt(
            path,
            format!(
                "has IDX element type 0x{:02x}; only unsigned bytes (0x08) are supported",
                bytes[2]
            ),
            fix,
        ));
    }
    let ndims = usize::from(bytes[3]);
    let header_len = 4 + 4 * ndims;
    if bytes.len() < header_len {
        return Err(DataError::corrupt(
            path,
            format!(
                "is truncated: the IDX header needs {header_len} bytes for {ndims} dimensions but the file holds {}",
                bytes.len()
            ),
            fix,
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let what = describe_dims(&dims);
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            DataError::corrupt(path, format!("has an impossible IDX header ({what})"), fix)
        })?;
    let held = bytes.len() - header_len;
    let unit = match ndims {
        3 => "pixels",
        1 => "labels",
        _ => "data",
    };
    if held < expected {
        return Err(DataError::corrupt(
            path,
            format!(
                "is truncated: header says {what} but the file holds {held} bytes of {unit} (expected {expected})"
            ),
            fix,
        ));
    }
    if held > expected {
        return Err(DataError::corrupt(
            path,
            format!(
                "has {} unexpected trailing bytes: header says {what} ({expected} bytes) but the file holds {held}",
                held - expected
            ),
            fix,
        ));
    }
    // Reuse the buffer: drop the header in place instead of copying the data.
    bytes.drain(..header_len);
    Ok(IdxArray { dims, data: bytes })
}

fn describe_magic(magic: u32) -> &'static str {
    match magic {
        IDX_IMAGES_MAGIC => "an IDX image file",
        IDX_LABELS_MAGIC => "an IDX label file",
        _ => "this file",
    }
}

fn describe_dims(dims: &[usize]) -> String {
    match dims {
        [n, h, w] => format!("{n} images of {h}x{w}"),
        [n] => format!("{n} labels"),
        _ => {
            let d: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            format!("dimensions {}", d.join("x"))
        }
    }
}

/// Serialises an IDX file of unsigned bytes (for writing fixtures).
///
/// The header is written as given, so it may disagree with `data` on purpose;
/// at most 255 dimensions are written and sizes above `u32::MAX` saturate.
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let dims = &dims[..dims.len().min(255)];
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + data.len());
    out.extend_from_slice(&[0, 0, 0x08, dims.len() as u8]);
    for &d in dims {
        out.extend_from_slice(&u32::try_from(d).unwrap_or(u32::MAX).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: Vec<u8>) -> Result<IdxArray, DataError> {
        parse_idx(Path::new("/x/f"), bytes, None, "FIX")
    }

    #[test]
    fn round_trip() {
        let data: Vec<u8> = (0..24).collect();
        let a = parse(encode_idx(&[2, 3, 4], &data)).unwrap();
        assert_eq!(a.dims, vec![2, 3, 4]);
        assert_eq!(a.data, data);
        let l = parse(encode_idx(&[3], &[1, 2, 3])).unwrap();
        assert_eq!(l.dims, vec![3]);
    }

    #[test]
    fn header_errors() {
        let msg = |r: Result<IdxArray, DataError>| r.unwrap_err().to_string();
        assert!(msg(parse(vec![0, 0])).contains("too short"));
        assert!(msg(parse(vec![1, 2, 3, 4, 5])).contains("not an IDX file"));
        assert!(msg(parse(vec![0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0])).contains("element type"));
        assert!(msg(parse(vec![0, 0, 8, 3, 0, 0])).contains("truncated"));
        let m = msg(parse(encode_idx(&[2, 3, 4], &[0; 20])));
        assert!(
            m.contains("header says 2 images of 3x4 but the file holds 20 bytes of pixels"),
            "{m}"
        );
        assert!(m.contains("/x/f") && m.contains("FIX"));
        assert!(msg(parse(encode_idx(&[2], &[0; 3]))).contains("trailing"));
        let huge = encode_idx(
            &[u32::MAX as usize, u32::MAX as usize, u32::MAX as usize],
            &[],
        );
        assert!(parse(huge).is_err());
    }

    #[test]
    fn expected_magic_is_enforced() {
        let r = parse_idx(
            Path::new("/x/l"),
            encode_idx(&[1, 1, 1], &[0]),
            Some(IDX_LABELS_MAGIC),
            "FIX",
        );
        let m = r.unwrap_err().to_string();
        assert!(m.contains("0x00000803") && m.contains("0x00000801"), "{m}");
    }
}
