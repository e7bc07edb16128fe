//! Clustering devices by capability: a Gaussian kernel density estimate over one number per
//! device, cut at the density's minima (FedTSA's capability clusters, methods.md §2).
//!
//! The bandwidth is Scott's rule for one dimension, h = σ·n^(−1/5) (σ the sample standard
//! deviation), as `scipy.stats.gaussian_kde` uses by default. The density is evaluated on a
//! fixed grid over the values' range; every strict local minimum inside the range is a cut,
//! and with more cuts than `max_clusters − 1` only the deepest (lowest density) are kept.
//! Clusters are numbered from the lowest capability up.

/// Points of the grid the density is evaluated on.
const GRID: usize = 1024;

/// The result of [`kde_clusters`].
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Cluster of each value, in input order; clusters are numbered from the lowest values up.
    pub labels: Vec<usize>,
    /// Capabilities at which the clusters are cut, ascending (one fewer than clusters).
    pub cuts: Vec<f64>,
    /// The kernel bandwidth used (0 when all values are equal).
    pub bandwidth: f64,
}

impl Clustering {
    /// Number of clusters.
    pub fn len(&self) -> usize {
        self.cuts.len() + 1
    }

    /// True when there is no value to cluster.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Clusters `values` (finite numbers, one per device) at the minima of their Gaussian KDE,
/// into at most `max_clusters` clusters (at least one).
pub fn kde_clusters(values: &[f64], max_clusters: usize) -> Clustering {
    let n = values.len();
    let single = |bandwidth| Clustering {
        labels: vec![0; n],
        cuts: Vec::new(),
        bandwidth,
    };
    if n < 2 {
        return single(0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let h = var.sqrt() * (n as f64).powf(-0.2);
    if !(h.is_finite() && h > 0.0) {
        return single(0.0);
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let step = (hi - lo) / (GRID - 1) as f64;
    let density: Vec<f64> = (0..GRID)
        .map(|i| {
            let x = lo + step * i as f64;
            values
                .iter()
                .map(|v| (-0.5 * ((x - v) / h).powi(2)).exp())
                .sum()
        })
        .collect();
    // Strict local minima inside the range; a flat valley counts once, at its middle.
    let mut minima: Vec<(f64, f64)> = Vec::new();
    let mut i = 1;
    while i + 1 < GRID {
        if density[i] < density[i - 1] {
            let mut j = i;
            while j + 1 < GRID && density[j + 1] == density[i] {
                j += 1;
            }
            if j + 1 < GRID && density[j + 1] > density[i] {
                let mid = (i + j) / 2;
                minima.push((lo + step * mid as f64, density[i]));
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    let keep = max_clusters.max(1) - 1;
    if minima.len() > keep {
        minima.sort_by(|a, b| a.1.total_cmp(&b.1));
        minima.truncate(keep);
    }
    let mut cuts: Vec<f64> = minima.into_iter().map(|(x, _)| x).collect();
    cuts.sort_by(f64::total_cmp);
    let labels = values
        .iter()
        .map(|v| cuts.iter().filter(|c| *v > **c).count())
        .collect();
    Clustering {
        labels,
        cuts,
        bandwidth: h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `per_tier` devices around each centre, spread evenly over ±10%.
    fn tiers(centres: &[f64], per_tier: usize) -> Vec<f64> {
        centres
            .iter()
            .flat_map(|c| {
                (0..per_tier).map(move |i| c * (0.9 + 0.2 * i as f64 / (per_tier - 1) as f64))
            })
            .collect()
    }

    #[test]
    fn three_tiers_with_spread_are_three_clusters() {
        // Memory budgets of 16, 64 and 256 MiB ±10%, clustered on a log scale.
        let budgets = tiers(&[16.0, 64.0, 256.0], 30);
        let log: Vec<f64> = budgets.iter().map(|b| b.log2()).collect();
        let c = kde_clusters(&log, 5);
        assert_eq!(c.len(), 3, "{c:?}");
        for (k, label) in c.labels.iter().enumerate() {
            assert_eq!(*label, k / 30, "device {k} ({} MiB)", budgets[k]);
        }
        // Cuts fall between the tiers.
        assert!(c.cuts[0] > (16.0f64 * 1.1).log2() && c.cuts[0] < (64.0f64 * 0.9).log2());
        assert!(c.cuts[1] > (64.0f64 * 1.1).log2() && c.cuts[1] < (256.0f64 * 0.9).log2());
        // Unequal tier sizes do not hide a tier.
        let mut skewed = tiers(&[1.0, 2.0], 50);
        skewed.extend(tiers(&[4.0], 5));
        let log: Vec<f64> = skewed.iter().map(|b| b.log2()).collect();
        assert_eq!(kde_clusters(&log, 5).len(), 3);
    }

    #[test]
    fn a_bimodal_sample_is_two_clusters_cut_between_the_modes() {
        let mut values = tiers(&[1.0], 20);
        values.extend(tiers(&[5.0], 20));
        let c = kde_clusters(&values, 4);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c.cuts[0] > 1.1 && c.cuts[0] < 4.5, "{c:?}");
        assert_eq!(c.labels, [vec![0; 20], vec![1; 20]].concat());
    }

    #[test]
    fn at_most_max_clusters_keeping_the_deepest_valleys() {
        let log: Vec<f64> = tiers(&[16.0, 64.0, 256.0], 30)
            .iter()
            .map(|b| b.log2())
            .collect();
        let two = kde_clusters(&log, 2);
        assert_eq!(two.len(), 2);
        let one = kde_clusters(&log, 1);
        assert_eq!(one.len(), 1);
        assert!(one.labels.iter().all(|&l| l == 0));
        assert_eq!(kde_clusters(&log, 0).len(), 1);
    }

    #[test]
    fn degenerate_inputs_are_one_cluster() {
        assert!(kde_clusters(&[], 3).is_empty());
        assert_eq!(kde_clusters(&[5.0], 3).labels, vec![0]);
        let same = kde_clusters(&[2.0; 10], 3);
        assert_eq!((same.len(), same.bandwidth), (1, 0.0));
        // One smooth bump: no valley, one cluster.
        let bump: Vec<f64> = (0..50).map(|i| (i as f64 / 49.0 - 0.5) * 0.2).collect();
        assert_eq!(kde_clusters(&bump, 4).len(), 1);
    }
}
