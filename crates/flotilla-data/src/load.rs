//! Loading a dataset's train and test split from a directory.

use std::path::{Path, PathBuf};

use crate::idx::{IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, parse_idx, read_maybe_gz};
use crate::{DataError, Dataset, DatasetKind, Split};

/// Bytes per CIFAR-10 record: one label byte, then the R, G and B planes of 32x32.
pub const CIFAR_RECORD_BYTES: usize = 1 + 3 * 32 * 32;

/// Sub-folder the CIFAR-10 binary archive unpacks into.
const CIFAR_SUBDIR: &str = "cifar-10-batches-bin";

/// Loads train and test split from `dir`.
///
/// MNIST and Fashion-MNIST expect the four IDX files
/// (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`), each raw or with a
/// `.gz` suffix. CIFAR-10 expects `data_batch_1.bin` … `data_batch_5.bin` and
/// `test_batch.bin` in `dir` or in `dir/cifar-10-batches-bin`.
pub fn load(kind: DatasetKind, dir: &Path) -> Result<Split, DataError> {
    match kind {
        DatasetKind::FashionMnist | DatasetKind::Mnist => Ok(Split {
            train: load_idx_pair(
                kind,
                dir,
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
            )?,
            test: load_idx_pair(
                kind,
                dir,
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )?,
        }),
        DatasetKind::Cifar10 => load_cifar(dir),
    }
}

/// Picks `name` or `name.gz` in `dir`, preferring the uncompressed file.
fn find_idx_file(kind: DatasetKind, dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let raw = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    if raw.exists() {
        Ok(raw)
    } else if gz.exists() {
        Ok(gz)
    } else {
        // Name the .gz first: that is what the packaged dataset installs.
        Err(DataError::NotFound {
            path: gz,
            also_tried: vec![raw],
            fix: kind.missing_fix(),
        })
    }
}

fn load_idx_pair(
    kind: DatasetKind,
    dir: &Path,
    images_name: &str,
    labels_name: &str,
) -> Result<Dataset, DataError> {
    let images_path = find_idx_file(kind, dir, images_name)?;
    let labels_path = find_idx_file(kind, dir, labels_name)?;
    let missing = kind.missing_fix();
    let corrupt = kind.corrupt_fix();

    let images = parse_idx(
        &images_path,
        read_maybe_gz(&images_path, &missing, &corrupt)?,
        Some(IDX_IMAGES_MAGIC),
        &corrupt,
    )?;
    let shape = kind.input_shape();
    if images.dims[1..] != shape[1..] {
        return Err(DataError::corrupt(
            &images_path,
            format!(
                "holds images of {}x{} but {kind} images are {}x{}",
                images.dims[1], images.dims[2], shape[1], shape[2]
            ),
            &corrupt,
        ));
    }
    let labels = parse_idx(
        &labels_path,
        read_maybe_gz(&labels_path, &missing, &corrupt)?,
        Some(IDX_LABELS_MAGIC),
        &corrupt,
    )?;
    if labels.dims[0] != images.dims[0] {
        return Err(DataError::corrupt(
            &labels_path,
            format!(
                "holds {} labels but {} holds {} images; the two files must come from the same release",
                labels.dims[0],
                images_path.display(),
                images.dims[0]
            ),
            &corrupt,
        ));
    }
    check_labels(kind, &labels_path, &labels.data, "at index", &corrupt)?;
    Ok(Dataset {
        images: images.data,
        labels: labels.data,
        shape,
        num_classes: kind.num_classes(),
    })
}

fn check_labels(
    kind: DatasetKind,
    path: &Path,
    labels: &[u8],
    position: &str,
    fix: &str,
) -> Result<(), DataError> {
    let classes = kind.num_classes();
    match labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= classes)
    {
        Some((i, &l)) => Err(DataError::corrupt(
            path,
            format!("holds label {l} {position} {i}; {kind} labels must be below {classes}"),
            fix,
        )),
        None => Ok(()),
    }
}

fn load_cifar(dir: &Path) -> Result<Split, DataError> {
    let kind = DatasetKind::Cifar10;
    let first = "data_batch_1.bin";
    let sub = dir.join(CIFAR_SUBDIR);
    let base = if dir.join(first).exists() {
        dir.to_path_buf()
    } else if sub.join(first).exists() {
        sub
    } else {
        return Err(DataError::NotFound {
            path: dir.join(first),
            also_tried: vec![sub.join(first)],
            fix: kind.missing_fix(),
        });
    };
    let mut train = empty_cifar();
    for i in 1..=5 {
        read_cifar_file(&base.join(format!("data_batch_{i}.bin")), &mut train)?;
    }
    let mut test = empty_cifar();
    read_cifar_file(&base.join("test_batch.bin"), &mut test)?;
    Ok(Split { train, test })
}

fn empty_cifar() -> Dataset {
    let kind = DatasetKind::Cifar10;
    Dataset {
        images: Vec::new(),
        labels: Vec::new(),
        shape: kind.input_shape(),
        num_classes: kind.num_classes(),
    }
}

/// Appends the records of one CIFAR-10 batch file to `out`.
fn read_cifar_file(path: &Path, out: &mut Dataset) -> Result<(), DataError> {
    let kind = DatasetKind::Cifar10;
    let corrupt = kind.corrupt_fix();
    let bytes = read_maybe_gz(path, &kind.missing_fix(), &corrupt)?;
    if bytes.is_empty() {
        return Err(DataError::corrupt(path, "is empty", &corrupt));
    }
    let rest = bytes.len() % CIFAR_RECORD_BYTES;
    if rest != 0 {
        return Err(DataError::corrupt(
            path,
            format!(
                "is truncated: its {} bytes are not a multiple of the {CIFAR_RECORD_BYTES}-byte record \
                 (1 label byte + 3072 pixel bytes); the last record holds only {rest} bytes",
                bytes.len()
            ),
            &corrupt,
        ));
    }
    let records = bytes.len() / CIFAR_RECORD_BYTES;
    out.labels.reserve(records);
    out.images.reserve(records * (CIFAR_RECORD_BYTES - 1));
    let start = out.labels.len();
    for rec in bytes.chunks_exact(CIFAR_RECORD_BYTES) {
        out.labels.push(rec[0]);
        // Records already store the R, G and B planes one after another: CHW.
        out.images.extend_from_slice(&rec[1..]);
    }
    check_labels(kind, path, &out.labels[start..], "in record", &corrupt)
}
