//! Loading IDX and CIFAR-10 files from disk, including damaged ones.

use std::io::Write;
use std::path::{Path, PathBuf};

use flotilla_data::{DataError, DatasetKind, encode_idx, load, read_idx};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Pixel value of image `i` at flat position `p`, for checking layouts.
fn pixel(i: usize, p: usize) -> u8 {
    ((i * 31 + p * 7) % 256) as u8
}

struct IdxSet {
    train_n: usize,
    test_n: usize,
    side: usize,
}

impl IdxSet {
    fn images(n: usize, side: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| (0..side * side).map(move |p| pixel(i, p)))
            .collect()
    }

    fn labels(n: usize) -> Vec<u8> {
        (0..n).map(|i| ((i * 3) % 10) as u8).collect()
    }

    /// Writes the four files; `gz` compresses them and adds the `.gz` suffix.
    fn write(&self, dir: &Path, gz: bool) {
        let s = self.side;
        let files = [
            (
                "train-images-idx3-ubyte",
                encode_idx(&[self.train_n, s, s], &Self::images(self.train_n, s)),
            ),
            (
                "train-labels-idx1-ubyte",
                encode_idx(&[self.train_n], &Self::labels(self.train_n)),
            ),
            (
                "t10k-images-idx3-ubyte",
                encode_idx(&[self.test_n, s, s], &Self::images(self.test_n, s)),
            ),
            (
                "t10k-labels-idx1-ubyte",
                encode_idx(&[self.test_n], &Self::labels(self.test_n)),
            ),
        ];
        for (name, bytes) in files {
            if gz {
                std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
}

const SMALL: IdxSet = IdxSet {
    train_n: 12,
    test_n: 5,
    side: 28,
};

fn check_small_split(dir: &Path, kind: DatasetKind) {
    let split = load(kind, dir).unwrap();
    assert_eq!(split.train.len(), 12);
    assert_eq!(split.test.len(), 5);
    assert_eq!(split.train.shape, [1, 28, 28]);
    assert_eq!(split.train.num_classes, 10);
    assert_eq!(split.train.labels, IdxSet::labels(12));
    assert_eq!(split.test.labels, IdxSet::labels(5));
    for i in [0, 7, 11] {
        let img = split.train.image(i);
        assert_eq!(img.len(), 784);
        assert_eq!(img[0], pixel(i, 0));
        assert_eq!(img[783], pixel(i, 783));
        assert_eq!(img[29], pixel(i, 29));
    }
    assert_eq!(split.test.image(4)[100], pixel(4, 100));
}

fn err_text(kind: DatasetKind, dir: &Path) -> String {
    match load(kind, dir) {
        Ok(_) => panic!("expected an error loading {}", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loads_raw_idx() {
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), false);
    check_small_split(dir.path(), DatasetKind::FashionMnist);
    check_small_split(dir.path(), DatasetKind::Mnist);
}

#[test]
fn loads_gzipped_idx() {
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), true);
    check_small_split(dir.path(), DatasetKind::FashionMnist);
}

#[test]
fn gzip_is_detected_by_content_not_name() {
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), true);
    // Gzip data under the raw name, raw data under the .gz name.
    let d = dir.path();
    std::fs::rename(
        d.join("train-images-idx3-ubyte.gz"),
        d.join("train-images-idx3-ubyte"),
    )
    .unwrap();
    std::fs::write(
        d.join("train-labels-idx1-ubyte.gz"),
        encode_idx(&[12], &IdxSet::labels(12)),
    )
    .unwrap();
    check_small_split(d, DatasetKind::Mnist);
}

#[test]
fn raw_file_is_preferred_over_gz() {
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), false);
    // A .gz sibling with different labels must be ignored.
    let other: Vec<u8> = vec![9; 12];
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte.gz"),
        gzip(&encode_idx(&[12], &other)),
    )
    .unwrap();
    let split = load(DatasetKind::Mnist, dir.path()).unwrap();
    assert_eq!(split.train.labels, IdxSet::labels(12));
}

#[test]
fn read_idx_reads_raw_and_gz() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = encode_idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
    let raw = dir.path().join("a");
    let gz = dir.path().join("b.gz");
    std::fs::write(&raw, &bytes).unwrap();
    std::fs::write(&gz, gzip(&bytes)).unwrap();
    for p in [&raw, &gz] {
        let a = read_idx(p).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
    }
    let missing = dir.path().join("nope");
    let e = read_idx(&missing).unwrap_err();
    assert!(matches!(e, DataError::NotFound { .. }));
    assert!(e.to_string().contains(&missing.display().to_string()));
}

#[test]
fn missing_file_names_path_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let msg = err_text(DatasetKind::FashionMnist, dir.path());
    let want = dir.path().join("train-images-idx3-ubyte.gz");
    assert!(msg.contains(&want.display().to_string()), "{msg}");
    assert!(msg.contains("not found"), "{msg}");
    assert!(
        msg.contains("apt-get install dataset-fashion-mnist"),
        "{msg}"
    );
    assert!(
        msg.contains("--data-dir") && msg.contains("FLOTILLA_DATA"),
        "{msg}"
    );

    let msg = err_text(DatasetKind::Mnist, dir.path());
    assert!(msg.contains(DatasetKind::Mnist.install_hint()), "{msg}");

    // Only the test labels missing: the error names that file.
    SMALL.write(dir.path(), false);
    std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).unwrap();
    let msg = err_text(DatasetKind::FashionMnist, dir.path());
    assert!(msg.contains("t10k-labels-idx1-ubyte"), "{msg}");
}

fn corrupt_file(dir: &Path, name: &str, bytes: Vec<u8>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn assert_corrupt_msg(msg: &str, path: &Path, needle: &str) {
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(needle), "missing `{needle}` in: {msg}");
    assert!(msg.contains("reinstall"), "{msg}");
}

#[test]
fn truncated_images_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), false);
    let mut bytes = encode_idx(&[12, 28, 28], &IdxSet::images(12, 28));
    bytes.truncate(bytes.len() - 100);
    let p = corrupt_file(dir.path(), "train-images-idx3-ubyte", bytes);
    let msg = err_text(DatasetKind::FashionMnist, dir.path());
    assert_corrupt_msg(
        &msg,
        &p,
        &format!(
            "is truncated: header says 12 images of 28x28 but the file holds {} bytes of pixels",
            12 * 784 - 100
        ),
    );
    assert!(
        msg.contains("apt-get install --reinstall dataset-fashion-mnist"),
        "{msg}"
    );
}

#[test]
fn truncated_gzip_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), true);
    let p = dir.path().join("t10k-images-idx3-ubyte.gz");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&p, bytes).unwrap();
    let msg = err_text(DatasetKind::FashionMnist, dir.path());
    assert_corrupt_msg(&msg, &p, "gzip");
}

#[test]
fn wrong_magic_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), false);
    // A label file where the image file should be.
    let p = corrupt_file(
        dir.path(),
        "train-images-idx3-ubyte",
        encode_idx(&[12], &IdxSet::labels(12)),
    );
    let msg = err_text(DatasetKind::Mnist, dir.path());
    assert_corrupt_msg(&msg, &p, "magic number 0x00000801");
    assert!(msg.contains("0x00000803"), "{msg}");

    let p = corrupt_file(
        dir.path(),
        "train-images-idx3-ubyte",
        b"PK\x03\x04 not idx".to_vec(),
    );
    let msg = err_text(DatasetKind::Mnist, dir.path());
    assert_corrupt_msg(&msg, &p, "magic number");
}

#[test]
fn count_mismatch_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), false);
    let p = corrupt_file(
        dir.path(),
        "train-labels-idx1-ubyte",
        encode_idx(&[11], &IdxSet::labels(11)),
    );
    let msg = err_text(DatasetKind::FashionMnist, dir.path());
    assert_corrupt_msg(&msg, &p, "holds 11 labels");
    assert!(msg.contains("12 images"), "{msg}");
}

#[test]
fn bad_label_and_bad_image_size_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), false);
    let mut labels = IdxSet::labels(5);
    labels[3] = 10;
    let p = corrupt_file(
        dir.path(),
        "t10k-labels-idx1-ubyte",
        encode_idx(&[5], &labels),
    );
    let msg = err_text(DatasetKind::FashionMnist, dir.path());
    assert_corrupt_msg(&msg, &p, "label 10 at index 3");

    let dir = tempfile::tempdir().unwrap();
    IdxSet {
        train_n: 3,
        test_n: 2,
        side: 32,
    }
    .write(dir.path(), false);
    let msg = err_text(DatasetKind::Mnist, dir.path());
    assert!(msg.contains("32x32") && msg.contains("28x28"), "{msg}");
}

#[test]
fn random_bytes_never_panic() {
    let names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let dir = tempfile::tempdir().unwrap();
    SMALL.write(dir.path(), false);
    for round in 0..200 {
        let name = names[round % 4];
        let original = std::fs::read(dir.path().join(name)).unwrap();
        let len = rng.random_range(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        match round % 4 {
            // Plausible IDX header, random body.
            0 if len >= 8 => bytes[..4].copy_from_slice(&[0, 0, 8, 1 + (round % 3) as u8]),
            // Gzip magic, random body.
            1 if len >= 2 => bytes[..2].copy_from_slice(&[0x1f, 0x8b]),
            // A real gzip stream cut short.
            2 => {
                let full = gzip(&encode_idx(&[12], &IdxSet::labels(12)));
                bytes = full[..len.min(full.len() - 1)].to_vec();
            }
            _ => {}
        }
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes).unwrap();
        assert!(
            load(DatasetKind::FashionMnist, dir.path()).is_err(),
            "{bytes:?}"
        );
        // read_idx may accept a well-formed random file, but must not panic.
        let _ = read_idx(&p);
        std::fs::write(&p, original).unwrap();
    }
}

/// Writes a CIFAR-10 binary set; record `r` of the whole set has label
/// `r % 10` and channel `c` pixel `p` value `(r + 60 * c + p) % 256`.
fn write_cifar(dir: &Path, train_counts: [usize; 5], test_count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let record = |r: usize| -> Vec<u8> {
        let mut v = vec![(r % 10) as u8];
        for c in 0..3 {
            v.extend((0..1024).map(|p| ((r + 60 * c + p) % 256) as u8));
        }
        v
    };
    let mut r = 0;
    for (b, &count) in train_counts.iter().enumerate() {
        let bytes: Vec<u8> = (r..r + count).flat_map(record).collect();
        r += count;
        std::fs::write(dir.join(format!("data_batch_{}.bin", b + 1)), bytes).unwrap();
    }
    let bytes: Vec<u8> = (1000..1000 + test_count).flat_map(record).collect();
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
}

fn check_cifar(dir: &Path) {
    let split = load(DatasetKind::Cifar10, dir).unwrap();
    assert_eq!(split.train.len(), 10);
    assert_eq!(split.test.len(), 3);
    assert_eq!(split.train.shape, [3, 32, 32]);
    assert_eq!(split.train.images.len(), 10 * 3072);
    assert_eq!(
        split.train.labels,
        (0..10).map(|r| r as u8).collect::<Vec<_>>()
    );
    assert_eq!(split.test.labels, vec![0, 1, 2]);
    for r in [0, 4, 9] {
        let img = split.train.image(r);
        for c in 0..3 {
            for p in [0, 33, 1023] {
                assert_eq!(img[c * 1024 + p], ((r + 60 * c + p) % 256) as u8);
            }
        }
    }
    assert_eq!(split.test.image(2)[2048], ((1002 + 120) % 256) as u8);
}

#[test]
fn loads_cifar_binary() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path(), [2, 3, 1, 2, 2], 3);
    check_cifar(dir.path());
}

#[test]
fn loads_cifar_from_subfolder() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(&dir.path().join("cifar-10-batches-bin"), [2, 3, 1, 2, 2], 3);
    check_cifar(dir.path());
}

#[test]
fn cifar_errors_name_path_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let msg = err_text(DatasetKind::Cifar10, dir.path());
    assert!(
        msg.contains(&dir.path().join("data_batch_1.bin").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("cifar-10-batches-bin"), "{msg}");
    assert!(msg.contains("CIFAR-10 binary version"), "{msg}");

    write_cifar(dir.path(), [1, 1, 1, 1, 1], 1);
    let p = dir.path().join("data_batch_3.bin");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.pop();
    std::fs::write(&p, bytes).unwrap();
    let msg = err_text(DatasetKind::Cifar10, dir.path());
    assert_corrupt_msg(&msg, &p, "3073");

    write_cifar(dir.path(), [1, 1, 1, 1, 1], 1);
    let p = dir.path().join("test_batch.bin");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0] = 42;
    std::fs::write(&p, bytes).unwrap();
    let msg = err_text(DatasetKind::Cifar10, dir.path());
    assert_corrupt_msg(&msg, &p, "label 42");

    std::fs::remove_file(&p).unwrap();
    let msg = err_text(DatasetKind::Cifar10, dir.path());
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains("not found"),
        "{msg}"
    );

    std::fs::write(&p, b"").unwrap();
    assert_corrupt_msg(&err_text(DatasetKind::Cifar10, dir.path()), &p, "empty");
}

#[test]
fn real_fashion_mnist_if_installed() {
    let dir = DatasetKind::FashionMnist.default_dir();
    if !dir.join("train-images-idx3-ubyte.gz").exists()
        && !dir.join("train-images-idx3-ubyte").exists()
    {
        eprintln!("skipping: Fashion-MNIST not installed at {}", dir.display());
        return;
    }
    let split = load(DatasetKind::FashionMnist, &dir).unwrap();
    assert_eq!(split.train.len(), 60000);
    assert_eq!(split.train.len(), DatasetKind::FashionMnist.train_len());
    assert_eq!(split.test.len(), 10000);
    assert_eq!(split.train.shape, [1, 28, 28]);
    assert_eq!(split.train.images.len(), 60000 * 784);
    // Fashion-MNIST is exactly balanced.
    assert_eq!(split.train.label_histogram(), vec![6000; 10]);
    assert_eq!(split.test.label_histogram(), vec![1000; 10]);
    // The documented mean is close to the real one.
    let mean = split.train.images.iter().map(|&p| p as f64).sum::<f64>()
        / split.train.images.len() as f64
        / 255.0;
    assert!((mean - 0.2860).abs() < 1e-3, "mean {mean}");
}
