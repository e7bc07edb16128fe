//! The methods and their `[method]` options in one table: what `flotilla methods` prints and
//! what config errors point to. A test builds every method with every option set to its listed
//! default, so the table cannot drift from what the methods accept.

/// One key of a method's `[method]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodOption {
    /// The key.
    pub key: &'static str,
    /// Its default as a TOML value, or `None` when the default is computed (the meaning
    /// says how) or the key is required.
    pub default: Option<&'static str>,
    /// What it sets.
    pub meaning: &'static str,
}

/// A method (or a family sharing one implementation and options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    /// The names accepted in `[method] name = …`.
    pub names: &'static [&'static str],
    /// What it is, in a line.
    pub summary: &'static str,
    /// Its options besides `name`.
    pub options: &'static [MethodOption],
    /// The documentation page.
    pub doc: &'static str,
}

const fn opt(
    key: &'static str,
    default: Option<&'static str>,
    meaning: &'static str,
) -> MethodOption {
    MethodOption {
        key,
        default,
        meaning,
    }
}

const ROBUST: [MethodOption; 4] = [
    opt(
        "aggregator",
        Some("\"mean\""),
        "mean, median, trimmed-mean or krum",
    ),
    opt(
        "trim",
        Some("0"),
        "replies dropped at each end (trimmed-mean; at least 1 there)",
    ),
    opt("byzantine", Some("0"), "faulty clients Krum tolerates"),
    opt(
        "krum_select",
        Some("1"),
        "replies Krum averages (1: classic Krum)",
    ),
];

/// The options FLL and FedSSL share: the objective and the augmentations of its two views.
const SSL: [MethodOption; 4] = [
    opt(
        "objective",
        Some("\"contrastive\""),
        "contrastive (NT-Xent) or supervised",
    ),
    opt("temperature", Some("0.2"), "NT-Xent temperature τ"),
    opt(
        "projection_dim",
        Some("128"),
        "outputs of the projection head",
    ),
    opt(
        "augment",
        Some("{ crop_min_scale = 0.35, flip = 0.5, noise = 0.1, erase = 0.25 }"),
        "the augmentations of each view",
    ),
];

/// Every method, in the order the README lists them.
pub const CATALOG: &[MethodInfo] = &[
    MethodInfo {
        names: &["fedavg"],
        summary: "FedAvg: example-weighted mean of full-model updates",
        options: &ROBUST,
        doc: "README.md",
    },
    MethodInfo {
        names: &["fedprox"],
        summary: "FedProx: FedAvg with a proximal term μ/2‖w − w_global‖² on the clients",
        options: &[
            opt("mu", None, "proximal weight μ (required, e.g. 0.01)"),
            ROBUST[0],
            ROBUST[1],
            ROBUST[2],
            ROBUST[3],
        ],
        doc: "README.md",
    },
    MethodInfo {
        names: &["fedmap"],
        summary: "FedMap: iterative global magnitude pruning on nested masks",
        options: &[
            opt(
                "variant",
                Some("\"nested\""),
                "nested, recompute or one-shot",
            ),
            opt(
                "rate",
                Some("0.2"),
                "fraction of the remaining prunable weights removed per event",
            ),
            opt("period", Some("5"), "rounds between pruning events"),
            opt("warmup", Some("10"), "dense rounds before the first event"),
            opt(
                "target_sparsity",
                Some("0.9"),
                "pruning stops at this fraction removed",
            ),
            opt(
                "min_layer_density",
                Some("0.01"),
                "no tensor keeps fewer than this fraction",
            ),
        ],
        doc: "docs/methods/fedmap.md",
    },
    MethodInfo {
        names: &["flextrain", "fedsmall", "fedclass"],
        summary: "FlexTrain (depth prefixes per device memory, auto-distillation) and its baselines",
        options: &[
            opt("beta", Some("0.2"), "auto-distillation weight β"),
            opt(
                "aggregation",
                Some("\"all\""),
                "all (the paper's) or holders (HeteroFL-style)",
            ),
            opt(
                "student",
                Some("\"one-block\""),
                "one-block or next-class: the prefix distilled into",
            ),
            opt(
                "distill_on",
                Some("\"logits\""),
                "logits or softmax: what the distillation compares",
            ),
            opt(
                "depths",
                None,
                "depths a device may be given (default: every depth)",
            ),
        ],
        doc: "docs/methods/flextrain.md",
    },
    MethodInfo {
        names: &["fedlrt"],
        summary: "FeDLRT: shared low-rank bases, clients train only the core, the rank adapts",
        options: &[
            opt(
                "layers",
                None,
                "layers to factor (default: every linear layer but the classifier)",
            ),
            opt("r0", Some("32"), "initial rank"),
            opt("r_min", Some("2"), "smallest rank after truncation"),
            opt(
                "r_max",
                None,
                "largest rank after truncation (default min(in, out)/2)",
            ),
            opt("tau", Some("0.05"), "relative truncation tolerance τ"),
            opt(
                "s_star",
                None,
                "local core steps (default: training.epochs passes)",
            ),
            opt(
                "vc",
                Some("\"simplified\""),
                "variance correction: none, simplified or full",
            ),
            opt(
                "grad_batches",
                None,
                "batches of the gradient pass (default 4, one full pass with a correction)",
            ),
        ],
        doc: "docs/methods/fedlrt.md",
    },
    MethodInfo {
        names: &["fedlin"],
        summary: "FedLin: FeDLRT's round with every layer dense and the simplified correction",
        options: &[
            opt(
                "s_star",
                None,
                "local steps (default: training.epochs passes)",
            ),
            opt(
                "grad_batches",
                None,
                "batches of the gradient pass (default: one full pass)",
            ),
        ],
        doc: "docs/methods/fedlrt.md",
    },
    MethodInfo {
        names: &["fll"],
        summary: "FLL + depth dropout: layer-wise self-supervised training of a ViT",
        options: &[
            SSL[0],
            SSL[1],
            SSL[2],
            opt(
                "stage_rounds",
                None,
                "rounds of each stage (default: equal stages)",
            ),
            opt(
                "dd_rate",
                Some("0.0"),
                "probability of dropping each frozen block",
            ),
            opt(
                "dd_keep_last",
                Some("false"),
                "always keep the block below the trained one",
            ),
            opt(
                "cache_frozen",
                Some("true"),
                "clients keep frozen blocks (sent once)",
            ),
            SSL[3],
        ],
        doc: "docs/methods/fll.md",
    },
    MethodInfo {
        names: &["fedssl"],
        summary: "FedSSL: the FLL encoder and objective trained end to end",
        options: &SSL,
        doc: "docs/methods/fll.md",
    },
    MethodInfo {
        names: &[
            "fedtsa",
            "fedtsa-stage1",
            "feddf",
            "fedavg-smallest",
            "heterofl",
            "fedrolex",
        ],
        summary: "FedTSA: capability clusters, a width per cluster, mutual learning on server data; and its baselines",
        options: &[
            opt(
                "widths",
                Some("[1.0, 0.5, 0.25]"),
                "the model ladder, relative to [model] width",
            ),
            opt("max_clusters", Some("4"), "most capability clusters"),
            opt(
                "temperature",
                Some("3.0"),
                "softening temperature T of stage 2",
            ),
            opt(
                "server_samples",
                Some("2000"),
                "server images per round in stage 2 (0: all)",
            ),
            opt("server_epochs", Some("1"), "stage-2 passes over them"),
            opt(
                "server_lr",
                None,
                "stage-2 learning rate (default: training.lr)",
            ),
            opt(
                "server_batch",
                None,
                "stage-2 batch size (default: training.batch_size)",
            ),
            opt(
                "refresh",
                Some("256"),
                "server images between recomputed mutual targets",
            ),
        ],
        doc: "docs/methods/fedtsa.md",
    },
];

/// The catalog as a plain-text table: each method, then its options with their defaults.
pub fn table() -> String {
    let mut out = String::new();
    for m in CATALOG {
        out.push_str(&format!(
            "{}: {}  ({})\n",
            m.names.join(", "),
            m.summary,
            m.doc
        ));
        for o in m.options {
            out.push_str(&format!(
                "    {:<18} {:<16} {}\n",
                o.key,
                o.default.unwrap_or("-"),
                o.meaning
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_names_every_method_once() {
        let mut names: Vec<&str> = CATALOG
            .iter()
            .flat_map(|m| m.names.iter().copied())
            .collect();
        let mut methods = crate::METHODS.to_vec();
        names.sort_unstable();
        methods.sort_unstable();
        assert_eq!(names, methods);
    }
}
