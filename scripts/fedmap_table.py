#!/usr/bin/env python3
"""Builds docs/results/fedmap/README.md (markdown table) and SVG plots from the runs of
scripts/fedmap_experiment.sh. Standard library only."""
import json
import os
import statistics
import sys

from svgplot import svg_lines

RUNS, OUT = sys.argv[1], sys.argv[2]
VARIANTS = ["dense", "nested", "recompute", "one-shot"]
LABEL = {"dense": "dense FedAvg", "nested": "FedMap (nested)", "recompute": "non-nested recompute", "one-shot": "one-shot at end"}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def load(path):
    rows = [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl")) if l.strip()]
    return rows, json.load(open(os.path.join(path, "summary.json")))


os.makedirs(OUT, exist_ok=True)
lines = ["# FedMap vs baselines on W1 (Fashion-MNIST, FedAvg CNN)", "",
         "Produced by `scripts/fedmap_experiment.sh 40` (40 rounds; about 55 minutes on 2 cores), which runs",
         "the simulations and then `scripts/fedmap_table.py runs/fedmap docs/results/fedmap` (this page).",
         "Each run's config, metrics.jsonl and summary.json are kept under `runs/` beside this page.",
         "",
         "Uplink over the run counts every round: the schedule (warm-up 5 rounds, a pruning event every",
         "3 rounds at p_G = 0.2) reaches 90% sparsity only at round 35 of 40, so early dense rounds",
         "dominate the total; the per-client uplink of the last round shows the steady-state saving.", "",
         "| partition | method | final acc. (%) | Δ vs dense (pt) | final sparsity | active params | uplink over the run (MB) | uplink vs dense | last-round uplink per client (KB) | client acc. std (pt, mean over eval rounds) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for part in ["iid", "dirichlet"]:
    runs = {v: load(os.path.join(RUNS, part, v)) for v in VARIANTS if os.path.exists(os.path.join(RUNS, part, v, "summary.json"))}
    if "dense" not in runs:
        continue
    dense_acc = runs["dense"][1]["final_test_accuracy"]
    dense_up = runs["dense"][1]["total_bytes_up"]
    for v, (rows, s) in runs.items():
        last = rows[-1]
        acc = s["final_test_accuracy"]
        stds = [r["client_accuracy_std"] for r in rows if "client_accuracy_std" in r]
        spread = f"{100*statistics.mean(stds):.2f}" if stds else "-"
        lines.append(f"| {part} | {LABEL[v]} | {100*acc:.2f} | {100*(acc-dense_acc):+.2f} | {last.get('sparsity', 0.0):.3f} | "
                     f"{last.get('active_params', 1663370)} | {s['total_bytes_up']/1e6:.1f} | {dense_up/s['total_bytes_up']:.2f}× lower | "
                     f"{last['bytes_up']/max(1, last['clients'])/1e3:.0f} | {spread} |")
    ser = lambda f: [(LABEL[v], COLORS[i], f(runs[v][0])) for i, v in enumerate(VARIANTS) if v in runs]
    acc_pts = lambda rows, xf: [(xf(r, rows), 100 * r["test_accuracy"]) for r in rows if r["test_accuracy"] is not None]
    cum = lambda r, rows: sum(q["bytes_up"] for q in rows if q["round"] <= r["round"]) / 1e6
    svg_lines(f"Accuracy vs sparsity ({part})", "sparsity of conv/linear weights", "test accuracy (%)",
              ser(lambda rows: acc_pts(rows, lambda r, _: r.get("sparsity", 0.0))), os.path.join(OUT, f"{part}_accuracy_vs_sparsity.svg"))
    svg_lines(f"Accuracy vs cumulative uplink ({part})", "cumulative uplink (MB)", "test accuracy (%)",
              ser(lambda rows: acc_pts(rows, cum)), os.path.join(OUT, f"{part}_accuracy_vs_uplink.svg"))
    svg_lines(f"Uplink bytes per round ({part})", "round", "uplink (MB)",
              ser(lambda rows: [(r["round"], r["bytes_up"] / 1e6) for r in rows]), os.path.join(OUT, f"{part}_bytes_per_round.svg"))
    svg_lines(f"Client-to-client accuracy spread ({part})", "round", "std of holdout accuracy (pt)",
              ser(lambda rows: [(r["round"], 100 * r["client_accuracy_std"]) for r in rows if "client_accuracy_std" in r]), os.path.join(OUT, f"{part}_client_spread.svg"))
lines += ["", "Plots: `*_accuracy_vs_sparsity.svg`, `*_accuracy_vs_uplink.svg`, `*_bytes_per_round.svg`, `*_client_spread.svg`."]
open(os.path.join(OUT, "README.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
