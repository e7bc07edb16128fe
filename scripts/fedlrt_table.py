#!/usr/bin/env python3
"""Builds docs/results/fedlrt/README.md (tables) and SVG plots from the runs of
scripts/fedlrt_experiment.sh. Standard library only.

Usage: scripts/fedlrt_table.py RUNS OUT
RUNS holds SETTING/METHOD/ run directories (SETTING: iid-16, dirichlet-32, iid-4, ...)."""
import json
import os
import sys

from svgplot import svg_lines

RUNS, OUT = sys.argv[1], sys.argv[2]
METHODS = ["fedavg", "fedlin", "fedlrt-none", "fedlrt-simplified", "fedlrt-full",
           "fedlin-g4", "fedlrt-simplified-g4", "fedlrt-full-g4"]
LABEL = {
    "fedavg": "FedAvg (dense)",
    "fedlin": "FedLin (dense, corrected)",
    "fedlrt-none": "FeDLRT, vc = none",
    "fedlrt-simplified": "FeDLRT, vc = simplified",
    "fedlrt-full": "FeDLRT, vc = full",
    "fedlin-g4": "FedLin, 4-batch gradients",
    "fedlrt-simplified-g4": "FeDLRT, simplified, 4-batch gradients",
    "fedlrt-full-g4": "FeDLRT, full, 4-batch gradients",
}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def load(path):
    rows = [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl")) if l.strip()]
    return rows, json.load(open(os.path.join(path, "summary.json")))


def runs_of(setting):
    out = {}
    for m in METHODS:
        p = os.path.join(RUNS, setting, m)
        if os.path.exists(os.path.join(p, "summary.json")):
            out[m] = load(p)
    return out


def cumulative(rows, key):
    total, out = 0.0, {}
    for r in rows:
        total += r[key]
        out[r["round"]] = total
    return out


def first_round_at(rows, target):
    for r in rows:
        if r["test_accuracy"] is not None and r["test_accuracy"] >= target:
            return r["round"]
    return None


def fmt_ratio(base, x):
    return f"{base / x:.1f}×" if x else "-"


os.makedirs(OUT, exist_ok=True)
lines = [
    "# FeDLRT against FedAvg and FedLin (Fashion-MNIST, 784-512-512-10 MLP)",
    "",
    "Produced by `scripts/fedlrt_experiment.sh`, which runs the simulations and then",
    "`scripts/fedlrt_table.py runs/fedlrt docs/results/fedlrt` (this page). Each run's config,",
    "metrics.jsonl and summary.json are kept under `runs/` beside this page. All figures are",
    "flotilla's own measurements: bytes are the encoded messages, FLOPs the per-layer formulas of",
    "the factored shapes, memory the client's measured heap high-water mark.",
    "",
]

TITLES = {
    "iid-16": "16 clients, IID",
    "dirichlet-32": "32 clients, Dirichlet(0.5)",
    "dirichlet-32-lr0.05": "32 clients, Dirichlet(0.5), learning rate 0.05 instead of 0.2",
}
SETTINGS = [s for s in TITLES if os.path.isdir(os.path.join(RUNS, s))]
for setting in SETTINGS:
    runs = runs_of(setting)
    if "fedavg" not in runs:
        continue
    base_rows, base = runs["fedavg"]
    target = base["final_test_accuracy"] - 0.01
    lines += [
        f"## {setting}: {TITLES[setting]}, all in every round",
        "",
        f"Equal-accuracy point: the first evaluated round at which a method reaches FedAvg's final "
        f"accuracy − 1 point ({100 * target:.2f}%). Bytes (up + down) and client training FLOPs are summed "
        "up to that round.",
        "",
        "| method | final acc. (%) | best (%) | round at target | bytes to target (MB) | vs FedAvg | client FLOPs to target (T) | vs FedAvg | bytes per round vs FedAvg | client FLOPs per round vs FedAvg | peak client memory (MB) | final mean rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_round = first_round_at(base_rows, target)
    base_bytes = cumulative(base_rows, "bytes_up")
    base_down = cumulative(base_rows, "bytes_down")
    base_flops = cumulative(base_rows, "flops")
    ref_bytes = base_bytes[base_round] + base_down[base_round] if base_round else None
    ref_flops = base_flops[base_round] if base_round else None
    for m, (rows, s) in runs.items():
        rnd = first_round_at(rows, target)
        up, down, fl = cumulative(rows, "bytes_up"), cumulative(rows, "bytes_down"), cumulative(rows, "flops")
        if rnd:
            b = up[rnd] + down[rnd]
            f = fl[rnd]
            bytes_cell = f"{b / 1e6:.1f}"
            flops_cell = f"{f / 1e12:.2f}"
            vs_b = fmt_ratio(ref_bytes, b) if ref_bytes else "-"
            vs_f = fmt_ratio(ref_flops, f) if ref_flops else "-"
        else:
            bytes_cell = flops_cell = vs_b = vs_f = "not reached"
        rank = rows[-1].get("rank_mean")
        per_round_bytes = (base["total_bytes_up"] + base["total_bytes_down"]) / (s["total_bytes_up"] + s["total_bytes_down"])
        per_round_flops = base["total_flops"] / s["total_flops"] if s["total_flops"] else 0
        lines.append(
            f"| {LABEL[m]} | {100 * s['final_test_accuracy']:.2f} | {100 * s['best_test_accuracy']:.2f} | "
            f"{rnd or 'not reached'} | {bytes_cell} | {vs_b} | {flops_cell} | {vs_f} | "
            f"{per_round_bytes:.1f}× | {per_round_flops:.1f}× | "
            f"{s['peak_client_memory_bytes'] / 1e6:.1f} | {rank if rank is not None else '-'} |"
        )
    lines.append("")
    ser = lambda f: [(LABEL[m], COLORS[i], f(runs[m][0])) for i, m in enumerate(METHODS) if m in runs]
    svg_lines(f"Test accuracy ({setting})", "round", "test accuracy (%)",
              ser(lambda rows: [(r["round"], 100 * r["test_accuracy"]) for r in rows if r["test_accuracy"] is not None]),
              os.path.join(OUT, f"{setting}_accuracy.svg"))
    svg_lines(f"Cumulative bytes, up + down ({setting})", "round", "MB",
              ser(lambda rows: [(k, (cumulative(rows, "bytes_up")[k] + cumulative(rows, "bytes_down")[k]) / 1e6)
                                for k in cumulative(rows, "bytes_up")]),
              os.path.join(OUT, f"{setting}_bytes.svg"))
    svg_lines(f"Cumulative client training FLOPs ({setting})", "round", "TFLOP",
              ser(lambda rows: [(k, v / 1e12) for k, v in cumulative(rows, "flops").items()]),
              os.path.join(OUT, f"{setting}_flops.svg"))
    rank_series = []
    for i, m in enumerate(METHODS):
        if m in runs and m.startswith("fedlrt") and not m.endswith("-g4"):
            rows = runs[m][0]
            for j, layer in enumerate(sorted(k for k in rows[0] if k.startswith("rank/"))):
                label = f"{m.split('-')[1]}, {layer.split('/')[1]}"
                color = COLORS[i] if j == 0 else COLORS[i] + "88"
                rank_series.append((label, color, [(r["round"], r[layer]) for r in rows]))
    svg_lines(f"Rank per layer after truncation ({setting})", "round", "rank", rank_series,
              os.path.join(OUT, f"{setting}_rank.svg"))
    lines.append(f"Plots: `{setting}_accuracy.svg`, `{setting}_rank.svg`, `{setting}_bytes.svg`, `{setting}_flops.svg`.")
    lines.append("")

scaling = [c for c in [4, 8, 16, 32] if os.path.isdir(os.path.join(RUNS, f"iid-{c}"))]
if scaling:
    lines += [
        "## Scaling with the number of clients (IID, 30,000 images split evenly, all in every round)",
        "",
        "| clients | FedAvg final acc. (%) | FeDLRT (simplified) final acc. (%) | FeDLRT bytes per round vs FedAvg | FeDLRT client FLOPs per round vs FedAvg |",
        "|---|---|---|---|---|",
    ]
    finals = {}
    for c in scaling:
        runs = runs_of(f"iid-{c}")
        if "fedavg" not in runs or "fedlrt-simplified" not in runs:
            continue
        (ar, a), (lr, l) = runs["fedavg"], runs["fedlrt-simplified"]
        finals[c] = (a["final_test_accuracy"], l["final_test_accuracy"])
        bytes_ratio = (a["total_bytes_up"] + a["total_bytes_down"]) / (l["total_bytes_up"] + l["total_bytes_down"])
        lines.append(f"| {c} | {100 * finals[c][0]:.2f} | {100 * finals[c][1]:.2f} | {bytes_ratio:.1f}× lower | "
                     f"{a['total_flops'] / l['total_flops']:.1f}× lower |")
    if min(finals, default=None) is not None and len(finals) > 1:
        lo, hi = min(finals), max(finals)
        lines += ["", f"Accuracy lost from {lo} to {hi} clients: FedAvg {100 * (finals[lo][0] - finals[hi][0]):+.2f} pt, "
                      f"FeDLRT {100 * (finals[lo][1] - finals[hi][1]):+.2f} pt."]
    lines.append("")

# Hand-written findings (what holds, what does not, and why) follow the generated tables.
notes = os.path.join(OUT, "findings.md")
if os.path.exists(notes):
    lines += [open(notes).read().rstrip(), ""]

open(os.path.join(OUT, "README.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
