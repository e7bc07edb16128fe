//! Splitting a dataset's samples among federated clients.
//!
//! Every partitioner assigns each sample to exactly one client, returns each
//! client's indices in ascending order, and is fully determined by its seed.

use std::fmt;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, StandardNormal};

use crate::DataError;

/// How many Dirichlet draws are tried before giving up on `min_size`.
pub const DIRICHLET_MAX_ATTEMPTS: usize = 1000;

fn default_min_size() -> usize {
    10
}

/// How to split samples among clients.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PartitionSpec {
    /// Uniformly random, equal-sized (±1) clients.
    Iid,
    /// Label skew: each class is spread over clients by Dirichlet(alpha)
    /// proportions (smaller alpha = more skew), redrawn until every client
    /// holds at least `min_size` samples.
    Dirichlet {
        /// Concentration; finite and > 0.
        alpha: f64,
        /// Smallest allowed client size (default 10).
        #[serde(default = "default_min_size")]
        min_size: usize,
    },
    /// Pathological label skew after McMahan et al.: samples are sorted by
    /// label and cut into `num_clients * classes_per_client` shards, and each
    /// client gets `classes_per_client` shards. Shards never straddle a class
    /// boundary, so a client sees at most `classes_per_client` classes.
    Shards {
        /// Shards (and so at most classes) per client; 1..=num_classes.
        classes_per_client: usize,
    },
    /// Quantity skew: client sizes proportional to log-normal(0, sigma) draws,
    /// labels IID. `sigma = 0` gives equal sizes.
    QuantitySkew {
        /// Log-normal spread; finite and >= 0.
        sigma: f64,
    },
}

impl fmt::Display for PartitionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionSpec::Iid => write!(f, "iid"),
            PartitionSpec::Dirichlet { alpha, min_size } => {
                write!(f, "dirichlet(alpha={alpha}, min_size={min_size})")
            }
            PartitionSpec::Shards { classes_per_client } => {
                write!(f, "shards(classes_per_client={classes_per_client})")
            }
            PartitionSpec::QuantitySkew { sigma } => write!(f, "quantity-skew(sigma={sigma})"),
        }
    }
}

/// Splits the indices `0..labels.len()` among `num_clients` clients.
///
/// Returns one ascending index list per client; together they cover every
/// sample exactly once. The result depends only on the inputs and `seed`.
pub fn partition(
    labels: &[u8],
    num_classes: usize,
    num_clients: usize,
    spec: &PartitionSpec,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    let n = labels.len();
    validate_common(labels, num_classes, num_clients)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut parts = match *spec {
        PartitionSpec::Iid => iid(n, num_clients, &mut rng),
        PartitionSpec::Dirichlet { alpha, min_size } => {
            if !alpha.is_finite() || alpha <= 0.0 {
                return Err(invalid(format!(
                    "dirichlet alpha = {alpha} is not allowed: it must be a finite number > 0 \
                     (smaller is more skewed, e.g. 0.1 strong skew, 100 nearly IID)"
                )));
            }
            let need = min_size.saturating_mul(num_clients);
            if need > n {
                return Err(invalid(format!(
                    "dirichlet min_size = {min_size} with {num_clients} clients needs {need} samples \
                     but there are only {n}; lower min_size or use fewer clients"
                )));
            }
            dirichlet(labels, num_classes, num_clients, alpha, min_size, &mut rng)?
        }
        PartitionSpec::Shards { classes_per_client } => {
            if classes_per_client == 0 || classes_per_client > num_classes {
                return Err(invalid(format!(
                    "shards classes_per_client = {classes_per_client} is not allowed: it must be \
                     between 1 and num_classes = {num_classes}"
                )));
            }
            shards(
                labels,
                num_classes,
                num_clients,
                classes_per_client,
                &mut rng,
            )?
        }
        PartitionSpec::QuantitySkew { sigma } => {
            if !sigma.is_finite() || sigma < 0.0 {
                return Err(invalid(format!(
                    "quantity-skew sigma = {sigma} is not allowed: it must be a finite number >= 0 \
                     (0 gives equal sizes, 1 to 2 strong skew)"
                )));
            }
            quantity_skew(n, num_clients, sigma, &mut rng)
        }
    };
    for p in &mut parts {
        p.sort_unstable();
    }
    Ok(parts)
}

fn invalid(msg: String) -> DataError {
    DataError::InvalidPartition(msg)
}

fn validate_common(labels: &[u8], num_classes: usize, num_clients: usize) -> Result<(), DataError> {
    let n = labels.len();
    if num_clients == 0 {
        return Err(invalid(
            "num_clients = 0 is not allowed: at least 1 client is needed".to_string(),
        ));
    }
    if num_clients > n {
        return Err(invalid(format!(
            "num_clients = {num_clients} exceeds the {n} samples; every client needs at least \
             one sample, so use at most {n} clients"
        )));
    }
    if num_classes == 0 {
        return Err(invalid(
            "num_classes = 0 is not allowed: labels need at least 1 class".to_string(),
        ));
    }
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= num_classes)
    {
        return Err(invalid(format!(
            "label {l} at index {i} is not below num_classes = {num_classes}"
        )));
    }
    Ok(())
}

/// Cuts `order` into consecutive runs of the given sizes.
fn cut(order: &[usize], sizes: &[usize]) -> Vec<Vec<usize>> {
    let mut start = 0;
    sizes
        .iter()
        .map(|&s| {
            let end = (start + s).min(order.len());
            let part = order[start..end].to_vec();
            start = end;
            part
        })
        .collect()
}

fn iid(n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let sizes: Vec<usize> = (0..k).map(|i| n / k + usize::from(i < n % k)).collect();
    cut(&order, &sizes)
}

/// Indices of each class, ascending.
fn class_indices(labels: &[u8], num_classes: usize) -> Vec<Vec<usize>> {
    let mut by_class = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[usize::from(l)].push(i);
    }
    by_class
}

/// Draws Dirichlet(alpha, ..., alpha) proportions of length `k`.
///
/// Works in log space (Gamma(a) = Gamma(a + 1) * U^(1/a) for a < 1) because
/// for small alpha the plain Gamma draws underflow to zero.
fn dirichlet_draw(alpha: f64, k: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let shape = if alpha < 1.0 { alpha + 1.0 } else { alpha };
    let gamma = Gamma::new(shape, 1.0).ok();
    let logs: Vec<f64> = (0..k)
        .map(|_| {
            let g: f64 = gamma.as_ref().map_or(1.0, |d| d.sample(rng));
            let mut l = g.ln();
            if alpha < 1.0 {
                // 1 - U lies in (0, 1], so its log is finite.
                let u: f64 = 1.0 - rng.random::<f64>();
                l += u.ln() / alpha;
            }
            l
        })
        .collect();
    normalize_logs(&logs)
}

/// Turns log-weights into proportions summing to 1; uniform if they are unusable.
fn normalize_logs(logs: &[f64]) -> Vec<f64> {
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let k = logs.len().max(1) as f64;
    if !max.is_finite() {
        return vec![1.0 / k; logs.len()];
    }
    let w: Vec<f64> = logs.iter().map(|&l| (l - max).exp()).collect();
    let sum: f64 = w.iter().sum();
    if !sum.is_finite() || sum <= 0.0 {
        return vec![1.0 / k; logs.len()];
    }
    w.into_iter().map(|x| x / sum).collect()
}

/// Per-class Dirichlet split as in NIID-bench / FedLab: clients already above
/// the mean size get no share of later classes, and the whole draw is redone
/// until every client holds at least `min_size` samples.
fn dirichlet(
    labels: &[u8],
    num_classes: usize,
    k: usize,
    alpha: f64,
    min_size: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, DataError> {
    let n = labels.len();
    let by_class = class_indices(labels, num_classes);
    let fair = n as f64 / k as f64;
    for _ in 0..DIRICHLET_MAX_ATTEMPTS {
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); k];
        for idx in &by_class {
            if idx.is_empty() {
                continue;
            }
            let mut idx = idx.clone();
            idx.shuffle(rng);
            let raw = dirichlet_draw(alpha, k, rng);
            let masked: Vec<f64> = raw
                .iter()
                .zip(&parts)
                .map(|(&p, part)| if (part.len() as f64) < fair { p } else { 0.0 })
                .collect();
            let sum: f64 = masked.iter().sum();
            // If every client is already full, fall back to the raw draw.
            let (props, sum) = if sum > 0.0 && sum.is_finite() {
                (masked, sum)
            } else {
                (raw, 1.0)
            };
            let len = idx.len();
            let mut cum = 0.0;
            let mut start = 0usize;
            for (j, part) in parts.iter_mut().enumerate() {
                let end = if j + 1 == k {
                    len
                } else {
                    cum += props[j] / sum;
                    ((cum * len as f64) as usize).clamp(start, len)
                };
                part.extend_from_slice(&idx[start..end]);
                start = end;
            }
        }
        if parts.iter().all(|p| p.len() >= min_size) {
            return Ok(parts);
        }
    }
    Err(DataError::DirichletGaveUp {
        alpha,
        min_size,
        num_clients: k,
        num_samples: n,
        attempts: DIRICHLET_MAX_ATTEMPTS,
    })
}

fn shards(
    labels: &[u8],
    num_classes: usize,
    k: usize,
    per_client: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, DataError> {
    let n = labels.len();
    let num_shards = k.saturating_mul(per_client);
    if num_shards > n {
        return Err(invalid(format!(
            "shards: {k} clients x {per_client} classes_per_client = {num_shards} shards but there \
             are only {n} samples; lower classes_per_client or use fewer clients"
        )));
    }
    let by_class = class_indices(labels, num_classes);
    let present: Vec<usize> = (0..num_classes)
        .filter(|&c| !by_class[c].is_empty())
        .collect();
    if num_shards < present.len() {
        return Err(invalid(format!(
            "shards: {k} clients x {per_client} classes_per_client = {num_shards} shards cannot \
             cover the {} classes present; raise classes_per_client or use more clients",
            present.len()
        )));
    }
    // Shards per class: one each, then the rest go wherever shards are
    // currently largest, so shard sizes stay as even as possible.
    let mut count = vec![0usize; num_classes];
    for &c in &present {
        count[c] = 1;
    }
    for _ in present.len()..num_shards {
        let best = present
            .iter()
            .copied()
            .filter(|&c| count[c] < by_class[c].len())
            .max_by(|&a, &b| {
                let lhs = by_class[a].len() as u128 * count[b] as u128;
                let rhs = by_class[b].len() as u128 * count[a] as u128;
                lhs.cmp(&rhs).then(b.cmp(&a))
            });
        // num_shards <= n guarantees some class can still take a shard.
        if let Some(c) = best {
            count[c] += 1;
        }
    }
    let mut all_shards: Vec<Vec<usize>> = Vec::with_capacity(num_shards);
    for &c in &present {
        let mut idx = by_class[c].clone();
        idx.shuffle(rng);
        let (len, s) = (idx.len(), count[c]);
        for j in 0..s {
            all_shards.push(idx[j * len / s..(j + 1) * len / s].to_vec());
        }
    }
    all_shards.shuffle(rng);
    Ok(all_shards
        .chunks(per_client)
        .map(|group| group.concat())
        .collect())
}

fn quantity_skew(n: usize, k: usize, sigma: f64, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let logs: Vec<f64> = (0..k)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            sigma * z
        })
        .collect();
    let props = normalize_logs(&logs);
    // Everyone gets one sample; the rest is shared by largest remainder.
    let rest = n - k;
    let quotas: Vec<f64> = props.iter().map(|p| p * rest as f64).collect();
    let mut sizes: Vec<usize> = quotas.iter().map(|q| 1 + *q as usize).collect();
    let assigned: usize = sizes.iter().sum();
    let mut by_remainder: Vec<usize> = (0..k).collect();
    by_remainder.sort_by(|&a, &b| {
        let ra = quotas[a] - quotas[a].floor();
        let rb = quotas[b] - quotas[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in by_remainder.iter().take(n.saturating_sub(assigned)) {
        sizes[i] += 1;
    }
    // Rounding in the proportions can overshoot by a sample or two; take
    // those back from the largest clients so nobody ends up empty.
    let mut excess = sizes.iter().sum::<usize>().saturating_sub(n);
    while excess > 0 {
        let Some(big) = (0..k).max_by_key(|&i| sizes[i]) else {
            break;
        };
        if sizes[big] <= 1 {
            break;
        }
        sizes[big] -= 1;
        excess -= 1;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    cut(&order, &sizes)
}

/// One client's line in a [`PartitionSummary`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClientSummary {
    /// Client id (position in the partition).
    pub id: usize,
    /// Number of samples.
    pub size: usize,
    /// Number of classes with at least one sample.
    pub classes_present: usize,
    /// Samples per class.
    pub histogram: Vec<usize>,
    /// Total-variation distance between this client's label distribution and
    /// the global one; `None` for a client without samples.
    pub label_tv_distance: Option<f64>,
}

/// Per-client sizes and label histograms plus aggregate statistics of a partition.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PartitionSummary {
    /// Number of clients.
    pub num_clients: usize,
    /// Number of label classes.
    pub num_classes: usize,
    /// Total samples over all clients.
    pub total_samples: usize,
    /// Smallest client size.
    pub min_size: usize,
    /// Median client size.
    pub median_size: f64,
    /// Mean client size.
    pub mean_size: f64,
    /// Largest client size.
    pub max_size: usize,
    /// Mean number of classes present per client.
    pub mean_classes_per_client: f64,
    /// Mean (over non-empty clients) total-variation distance between each
    /// client's label distribution and the global one: 0 for IID, towards 1
    /// for extreme label skew.
    pub mean_label_tv_distance: f64,
    /// One entry per client.
    pub clients: Vec<ClientSummary>,
}

/// Summarises a partition. Indices outside `labels` and labels outside
/// `num_classes` are left out of the histograms rather than rejected.
pub fn summarize(parts: &[Vec<usize>], labels: &[u8], num_classes: usize) -> PartitionSummary {
    let hist_of = |idx: &mut dyn Iterator<Item = usize>| {
        let mut h = vec![0usize; num_classes];
        for i in idx {
            if let Some(c) = labels.get(i).and_then(|&l| h.get_mut(usize::from(l))) {
                *c += 1;
            }
        }
        h
    };
    let global = hist_of(&mut (0..labels.len()));
    let global_total: usize = global.iter().sum();
    let clients: Vec<ClientSummary> = parts
        .iter()
        .enumerate()
        .map(|(id, p)| {
            let histogram = hist_of(&mut p.iter().copied());
            let total: usize = histogram.iter().sum();
            let label_tv_distance = (total > 0 && global_total > 0).then(|| {
                0.5 * histogram
                    .iter()
                    .zip(&global)
                    .map(|(&a, &g)| {
                        (a as f64 / total as f64 - g as f64 / global_total as f64).abs()
                    })
                    .sum::<f64>()
            });
            ClientSummary {
                id,
                size: p.len(),
                classes_present: histogram.iter().filter(|&&c| c > 0).count(),
                histogram,
                label_tv_distance,
            }
        })
        .collect();
    let k = clients.len();
    let mut sizes: Vec<usize> = clients.iter().map(|c| c.size).collect();
    sizes.sort_unstable();
    let median_size = match k {
        0 => 0.0,
        _ if k % 2 == 1 => sizes[k / 2] as f64,
        _ => (sizes[k / 2 - 1] + sizes[k / 2]) as f64 / 2.0,
    };
    let mean = |sum: f64, count: usize| if count == 0 { 0.0 } else { sum / count as f64 };
    let tvs: Vec<f64> = clients.iter().filter_map(|c| c.label_tv_distance).collect();
    let total_samples: usize = sizes.iter().sum();
    PartitionSummary {
        num_clients: k,
        num_classes,
        total_samples,
        min_size: sizes.first().copied().unwrap_or(0),
        median_size,
        mean_size: mean(total_samples as f64, k),
        max_size: sizes.last().copied().unwrap_or(0),
        mean_classes_per_client: mean(clients.iter().map(|c| c.classes_present as f64).sum(), k),
        mean_label_tv_distance: mean(tvs.iter().sum(), tvs.len()),
        clients,
    }
}

/// Above this many clients, only the first and last few are listed.
const DISPLAY_ALL_UP_TO: usize = 50;
const DISPLAY_HEAD: usize = 20;
const DISPLAY_TAIL: usize = 5;

impl fmt::Display for PartitionSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} clients, {} samples, {} classes",
            self.num_clients, self.total_samples, self.num_classes
        )?;
        writeln!(
            f,
            "size min {} / median {:.1} / mean {:.1} / max {}; classes per client {:.2}; \
             label skew (mean TV distance to global) {:.3}",
            self.min_size,
            self.median_size,
            self.mean_size,
            self.max_size,
            self.mean_classes_per_client,
            self.mean_label_tv_distance
        )?;
        let id_w = self.num_clients.saturating_sub(1).to_string().len().max(6);
        let size_w = self.max_size.to_string().len().max(4);
        let bin_w = self
            .clients
            .iter()
            .flat_map(|c| c.histogram.iter())
            .max()
            .map_or(1, |m| m.to_string().len());
        write!(
            f,
            "{:>id_w$} {:>size_w$} classes  histogram",
            "client", "size"
        )?;
        let line = |f: &mut fmt::Formatter<'_>, c: &ClientSummary| -> fmt::Result {
            write!(
                f,
                "\n{:>id_w$} {:>size_w$} {:>7} ",
                c.id, c.size, c.classes_present
            )?;
            for h in &c.histogram {
                write!(f, " {h:>bin_w$}")?;
            }
            Ok(())
        };
        if self.clients.len() > DISPLAY_ALL_UP_TO {
            for c in &self.clients[..DISPLAY_HEAD] {
                line(f, c)?;
            }
            let omitted = self.clients.len() - DISPLAY_HEAD - DISPLAY_TAIL;
            write!(f, "\n{:>id_w$} ({omitted} clients omitted)", "...")?;
            for c in &self.clients[self.clients.len() - DISPLAY_TAIL..] {
                line(f, c)?;
            }
        } else {
            for c in &self.clients {
                line(f, c)?;
            }
        }
        Ok(())
    }
}
