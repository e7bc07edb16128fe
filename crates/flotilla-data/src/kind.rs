//! The supported datasets and their fixed properties.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::DataError;

/// Which dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// Zalando's Fashion-MNIST: 28x28 greyscale, 10 clothing classes.
    FashionMnist,
    /// The classic MNIST handwritten digits: 28x28 greyscale, 10 classes.
    Mnist,
    /// CIFAR-10, binary version: 32x32 RGB, 10 classes.
    Cifar10,
}

impl DatasetKind {
    /// All supported datasets.
    pub const ALL: [DatasetKind; 3] = [
        DatasetKind::FashionMnist,
        DatasetKind::Mnist,
        DatasetKind::Cifar10,
    ];

    /// The name used in configs and on the command line (same as the serde name).
    pub fn as_str(&self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
        }
    }

    /// Where the data is looked for when nothing else is configured.
    pub fn default_dir(&self) -> PathBuf {
        PathBuf::from("/usr/share/datasets").join(self.as_str())
    }

    /// A one-line hint on how to get the data in place.
    pub fn install_hint(&self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "apt-get install dataset-fashion-mnist",
            DatasetKind::Mnist => {
                "put the MNIST IDX files (train-images-idx3-ubyte[.gz] ...) there or pass --data-dir"
            }
            DatasetKind::Cifar10 => {
                "point --data-dir at the folder holding data_batch_1.bin … data_batch_5.bin and \
                 test_batch.bin (the CIFAR-10 binary version)"
            }
        }
    }

    /// Image shape as `[channels, height, width]`.
    pub fn input_shape(&self) -> [usize; 3] {
        match self {
            DatasetKind::FashionMnist | DatasetKind::Mnist => [1, 28, 28],
            DatasetKind::Cifar10 => [3, 32, 32],
        }
    }

    /// Number of label classes.
    pub fn num_classes(&self) -> usize {
        10
    }

    /// Number of training samples in the official release (what [`crate::load`] reads from
    /// complete files); configs check sizes against it before any file is opened.
    pub fn train_len(&self) -> usize {
        match self {
            DatasetKind::FashionMnist | DatasetKind::Mnist => 60_000,
            DatasetKind::Cifar10 => 50_000,
        }
    }

    /// Per-channel mean and standard deviation of the training pixels (in `[0, 1]` units).
    pub fn normalization(&self) -> (Vec<f32>, Vec<f32>) {
        match self {
            DatasetKind::FashionMnist => (vec![0.2860], vec![0.3530]),
            DatasetKind::Mnist => (vec![0.1307], vec![0.3081]),
            DatasetKind::Cifar10 => (vec![0.4914, 0.4822, 0.4465], vec![0.2470, 0.2435, 0.2616]),
        }
    }

    /// The fix to suggest when a file is missing.
    pub(crate) fn missing_fix(&self) -> String {
        match self {
            DatasetKind::FashionMnist => format!(
                "install it with `{}` or pass --data-dir / set FLOTILLA_DATA",
                self.install_hint()
            ),
            DatasetKind::Mnist => format!("{} / set FLOTILLA_DATA", self.install_hint()),
            DatasetKind::Cifar10 => format!("{}, or set FLOTILLA_DATA", self.install_hint()),
        }
    }

    /// The fix to suggest when a file exists but is damaged.
    pub(crate) fn corrupt_fix(&self) -> String {
        match self {
            DatasetKind::FashionMnist => {
                "the file is corrupt, reinstall it (`apt-get install --reinstall dataset-fashion-mnist`)"
                    .to_string()
            }
            DatasetKind::Mnist => {
                "the file is corrupt, reinstall it (replace it with a fresh copy of the MNIST IDX files)"
                    .to_string()
            }
            DatasetKind::Cifar10 => {
                "the file is corrupt, reinstall it (replace it with a fresh copy of the CIFAR-10 binary version)"
                    .to_string()
            }
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DatasetKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| DataError::UnknownDataset(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in DatasetKind::ALL {
            assert_eq!(k.as_str().parse::<DatasetKind>().unwrap(), k);
            assert_eq!(k.to_string(), k.as_str());
            assert!(k.default_dir().ends_with(k.as_str()));
        }
        assert!("imagenet".parse::<DatasetKind>().is_err());
    }

    #[test]
    fn shapes_and_normalization_agree() {
        for k in DatasetKind::ALL {
            let (m, s) = k.normalization();
            assert_eq!(m.len(), k.input_shape()[0]);
            assert_eq!(s.len(), k.input_shape()[0]);
            assert_eq!(k.num_classes(), 10);
        }
    }
}
