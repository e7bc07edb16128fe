//! Deciding where a dataset lives.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::DatasetKind;

/// Environment variable naming the data directory.
pub const DATA_ENV_VAR: &str = "FLOTILLA_DATA";

/// Where the data lives, in priority order: explicit CLI flag, config key, FLOTILLA_DATA env var, the kind's default_dir.
///
/// An empty value at any level counts as unset.
pub fn resolve_data_dir(cli: Option<&Path>, config: Option<&Path>, kind: DatasetKind) -> PathBuf {
    let env = std::env::var_os(DATA_ENV_VAR);
    resolve_data_dir_with_env(cli, config, env.as_deref(), kind)
}

/// [`resolve_data_dir`] with the environment value passed in, so it can be tested without touching the process environment.
pub fn resolve_data_dir_with_env(
    cli: Option<&Path>,
    config: Option<&Path>,
    env: Option<&OsStr>,
    kind: DatasetKind,
) -> PathBuf {
    cli.filter(|p| !p.as_os_str().is_empty())
        .or(config.filter(|p| !p.as_os_str().is_empty()))
        .map(Path::to_path_buf)
        .or_else(|| env.filter(|e| !e.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| kind.default_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_order() {
        let k = DatasetKind::FashionMnist;
        let cli = Path::new("/cli");
        let cfg = Path::new("/cfg");
        let env = OsStr::new("/env");
        let r = |a, b, c| resolve_data_dir_with_env(a, b, c, k);
        assert_eq!(r(Some(cli), Some(cfg), Some(env)), PathBuf::from("/cli"));
        assert_eq!(r(None, Some(cfg), Some(env)), PathBuf::from("/cfg"));
        assert_eq!(r(None, None, Some(env)), PathBuf::from("/env"));
        assert_eq!(
            r(None, None, None),
            PathBuf::from("/usr/share/datasets/fashion-mnist")
        );
        assert_eq!(
            resolve_data_dir_with_env(None, None, None, DatasetKind::Cifar10),
            PathBuf::from("/usr/share/datasets/cifar10")
        );
    }

    #[test]
    fn empty_values_count_as_unset() {
        let k = DatasetKind::Mnist;
        let empty = Path::new("");
        assert_eq!(
            resolve_data_dir_with_env(Some(empty), Some(empty), Some(OsStr::new("")), k),
            PathBuf::from("/usr/share/datasets/mnist")
        );
        assert_eq!(
            resolve_data_dir_with_env(Some(empty), None, Some(OsStr::new("/e")), k),
            PathBuf::from("/e")
        );
    }

    #[test]
    fn cli_wins_over_process_env() {
        // Only the CLI level is checked here so the result does not depend on
        // whatever FLOTILLA_DATA the test process inherited.
        let p = resolve_data_dir(Some(Path::new("/x")), None, DatasetKind::Mnist);
        assert_eq!(p, PathBuf::from("/x"));
    }
}
