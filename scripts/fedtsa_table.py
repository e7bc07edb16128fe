#!/usr/bin/env python3
"""Builds docs/results/fedtsa/README.md (tables, the issue's checks) and an SVG plot from the
runs of scripts/fedtsa_experiment.sh. Standard library only.
  scripts/fedtsa_table.py RUNS OUT"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from svgplot import svg_lines  # noqa: E402

RUNS, OUT = sys.argv[1], sys.argv[2]
METHODS = ["fedtsa", "fedtsa-stage1", "feddf", "heterofl", "fedrolex", "fedavg-smallest", "fedtsa-generated",
           "fedtsa-narrow", "fedtsa-stage1-narrow", "fedtsa-noise"]
LABEL = {"fedtsa": "FedTSA", "fedtsa-stage1": "FedTSA without stage 2", "feddf": "FedDF",
         "heterofl": "HeteroFL", "fedrolex": "FedRolex", "fedavg-smallest": "FedAvg on the smallest model",
         "fedtsa-generated": "FedTSA, stage 2 on generated images",
         "fedtsa-narrow": "FedTSA, ladder {1, 3/4, 1/2}",
         "fedtsa-stage1-narrow": "FedTSA without stage 2, ladder {1, 3/4, 1/2}",
         "fedtsa-noise": "FedTSA, stage 2 on noise-mixup images"}
COLORS = {"fedtsa": "#d62728", "fedtsa-stage1": "#1f77b4", "feddf": "#2ca02c", "heterofl": "#9467bd",
          "fedrolex": "#e377c2", "fedavg-smallest": "#8c564b", "fedtsa-generated": "#ff7f0e"}
os.makedirs(OUT, exist_ok=True)


def seeds(m):
    d = os.path.join(RUNS, m)
    if not os.path.isdir(d):
        return []
    return sorted(s for s in os.listdir(d) if os.path.exists(os.path.join(d, s, "summary.json")))


def load(m, s):
    d = os.path.join(RUNS, m, s)
    summary = json.load(open(os.path.join(d, "summary.json")))
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if l.strip()]
    clients = [json.loads(l) for l in open(os.path.join(d, "clients.jsonl")) if l.strip()]
    return summary, rows, clients


def tier_accuracy(m, rows):
    """Final accuracy of the model each tier deploys: cluster k is the k-th weakest tier."""
    last = [r for r in rows if r.get("test_accuracy") is not None][-1]
    if "test_accuracy/smallest" in last:
        return [last["test_accuracy/smallest"]] * 3
    if "test_accuracy/cluster-0" not in last:
        # One model for every device (FedAvg on the smallest): the run's accuracy.
        return [last["test_accuracy"]] * 3
    return [last.get(f"test_accuracy/cluster-{k}") for k in range(3)]


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(ms, scale=100):
    m, s = ms
    return "-" if m is None else f"{scale*m:.2f} ± {scale*s:.2f}"


results = {}
for m in METHODS:
    runs = [load(m, s) for s in seeds(m)]
    if runs:
        results[m] = runs

lines = ["# FedTSA on Fashion-MNIST: capability clusters, widths per cluster, mutual learning", "",
         "Produced by `scripts/fedtsa_experiment.sh` (config `examples/fedtsa.toml`, fleet `examples/fedtsa-fleet.csv`),",
         "tables and plot by `scripts/fedtsa_table.py`; the runs are in",
         f"`{RUNS}`, and each run's config, metrics and summary (and each generator's report) in `runs/` beside this file.",
         "Mean ± standard deviation over the seeds listed per row. Thirty devices in three memory tiers (±10%),",
         "Dirichlet α = 0.5, 1,000 images per device on average, 10 devices per round, 1 local epoch, the W1 CNN at width",
         "0.5 as the widest model. Stage 2 uses 2,000 of the 6,000 held-out images per round, labels withheld, T = 3.", ""]

# The clustering, from the FedTSA run of the first seed.
s0 = results["fedtsa"][0][0]
det = s0.get("method_details", {})
lines += ["## The clustering", "",
          f"Capability: {det.get('capability')}. Scott's bandwidth {det.get('bandwidth', 0):.3f}, cuts at "
          + ", ".join(f"{c:.3f}" for c in det.get("cuts", [])) + ".", "",
          "| cluster | devices | width | capability range |", "|---|---|---|---|"]
for c in det.get("clusters", []):
    lines.append(f"| {c['cluster']} | {c['devices']} | {c['width']} | {c['capability_min']:.2f} … {c['capability_max']:.2f} |")
lines += ["", "| width | parameters | training memory estimate (MiB) | training MFLOP per sample |", "|---|---|---|---|"]
for r in det.get("ladder", []):
    lines.append(f"| {r['width']} | {r['parameters']:,} | {r['memory_bytes']/1048576:.2f} | {r['train_flops_per_sample']/1e6:.2f} |")
lines.append("")

# Main table.
lines += ["## Accuracy and cost", "",
          "Tier accuracy: the test accuracy (10,000 images) of the model the tier's devices deploy; the mean device",
          "accuracy weights the tiers by their devices (ten each). Client and server figures are per run; wall times are",
          "of runs that shared the 2 cores with other work, so compare them loosely.", "",
          "| method | seeds | mean device accuracy | weakest tier | middle tier | strongest tier | uplink MB | client GFLOP | server GFLOP | server wall s | run wall s |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
acc = {}
tier = {}
for m, runs in results.items():
    acc[m] = mean_sd([r[0]["final_mean_device_accuracy"] for r in runs])
    per = [tier_accuracy(m, r[1]) for r in runs]
    tier[m] = [mean_sd([p[k] for p in per]) for k in range(3)]
    cost = lambda key: statistics.mean(r[0][key] for r in runs)
    lines.append(f"| {LABEL[m]} | {len(runs)} | **{fmt(acc[m])}** | " + " | ".join(fmt(t) for t in tier[m])
                 + f" | {cost('total_bytes_up')/1e6:.1f} | {cost('total_flops')/1e9:.0f} | {cost('total_server_flops')/1e9:.0f}"
                 + f" | {cost('server_wall_s'):.0f} | {cost('wall_time_s'):.0f} |")
lines.append("")

# Client cost per tier: FedTSA's tasks against FedAvg at the same width (the clusters-only run).
lines += ["## Client cost per tier", "",
          "Per task, from clients.jsonl of the first seed: FedTSA's client work is FedAvg's at the tier's width (the",
          "clusters-only run is exactly FedAvg inside each cluster).", "",
          "| method | tier | tasks | bytes up per task | bytes down per task | training FLOP per example |", "|---|---|---|---|---|---|"]
for m in ["fedtsa", "fedtsa-stage1", "heterofl", "fedrolex", "fedavg-smallest"]:
    if m not in results:
        continue
    cl = [c for c in results[m][0][2] if c["status"] == "ok"]
    for t in ["board", "old-pc", "new-pc"]:
        x = [c for c in cl if c["tier"] == t]
        if x:
            lines.append(f"| {LABEL[m]} | {t} | {len(x)} | {statistics.mean(c['bytes_up'] for c in x):,.0f} | "
                         f"{statistics.mean(c['bytes_down'] for c in x):,.0f} | "
                         f"{statistics.mean(c['flops'] / c['num_examples'] for c in x)/1e6:.3f} M |")
lines.append("")

# Paired differences: the seeds share partitions and fleets, so per-seed differences say more
# than the spread of either method.
pairs = [("fedtsa", "fedtsa-stage1"), ("fedtsa", "feddf"), ("fedtsa", "heterofl"), ("fedtsa", "fedrolex"),
         ("fedtsa", "fedavg-smallest"), ("fedtsa-narrow", "fedtsa-stage1-narrow"),
         ("fedtsa-generated", "fedtsa-stage1"), ("fedtsa-noise", "fedtsa-stage1"), ("fedtsa", "fedtsa-generated")]
lines += ["## Paired differences (mean device accuracy, points, per seed)", "",
          "| difference | per seed | mean |", "|---|---|---|"]
for a, b in pairs:
    if a in results and b in results:
        sa = {r[0]["seed"]: r[0]["final_mean_device_accuracy"] for r in results[a]}
        sb = {r[0]["seed"]: r[0]["final_mean_device_accuracy"] for r in results[b]}
        d = [100 * (sa[k] - sb[k]) for k in sorted(sa) if k in sb]
        if d:
            lines.append(f"| {LABEL[a]} − {LABEL[b]} | " + ", ".join(f"{x:+.2f}" for x in d) + f" | {statistics.mean(d):+.2f} |")
lines.append("")

# The checks, computed.
lines += ["## The claims, checked", ""]


def check(text, ok):
    lines.append(f"- {'**holds**' if ok else '**does not hold**'}: {text}")


if "fedtsa" in acc:
    m0, s0_ = acc["fedtsa"]
    for b in ["fedtsa-stage1", "feddf", "heterofl", "fedrolex", "fedavg-smallest"]:
        if b in acc:
            mb, sb = acc[b]
            check(f"FedTSA's mean device accuracy {100*m0:.2f} exceeds {LABEL[b]}'s {100*mb:.2f} by more than the "
                  f"seed-to-seed spread ({100*(m0-mb):+.2f} points; spread {100*max(s0_, sb):.2f})", m0 - mb > max(s0_, sb))
    if "fedavg-smallest" in tier:
        big, small = tier["fedtsa"][2][0], tier["fedavg-smallest"][2][0]
        check(f"the largest model ≥ FedAvg-smallest + 1 point ({100*big:.2f} vs {100*small:.2f})", big >= small + 0.01)
    if "fedtsa-stage1" in tier:
        a, b = tier["fedtsa"][0][0], tier["fedtsa-stage1"][0][0]
        check(f"the smallest model ≥ FedTSA-without-stage-2's smallest + 1 point ({100*a:.2f} vs {100*b:.2f})", a >= b + 0.01)
    if all(k in acc for k in ["fedtsa-stage1", "fedtsa-narrow", "fedtsa-stage1-narrow"]):
        wide = acc["fedtsa"][0] - acc["fedtsa-stage1"][0]
        narrow = acc["fedtsa-narrow"][0] - acc["fedtsa-stage1-narrow"][0]
        check(f"stage 2's gain is larger with the wide ladder {{1, 1/2, 1/4}} ({100*wide:+.2f} points) than with the "
              f"narrow {{1, 3/4, 1/2}} ({100*narrow:+.2f})", wide > narrow)
    if "fedtsa-noise" in acc and "fedtsa-generated" in acc:
        g, nz = acc["fedtsa-generated"][0], acc["fedtsa-noise"][0]
        check(f"the stage-2 sources order as held-out images ≥ generated ≥ noise-mixup ({100*m0:.2f}, {100*g:.2f}, {100*nz:.2f})",
              m0 >= g >= nz)
        if "fedtsa-stage1" in acc:
            check(f"FedTSA on generated images beats FedTSA without stage 2 by more than the spread "
                  f"({100*(g - acc['fedtsa-stage1'][0]):+.2f} points)",
                  g - acc["fedtsa-stage1"][0] > max(acc["fedtsa-generated"][1], acc["fedtsa-stage1"][1]))
lines.append("")

series = []
for m in ["fedtsa", "fedtsa-stage1", "feddf", "heterofl", "fedrolex", "fedavg-smallest", "fedtsa-generated"]:
    if m in results:
        rows = results[m][0][1]
        series.append((LABEL[m], COLORS[m], [(r["round"], 100 * r["mean_device_accuracy"]) for r in rows
                                              if r.get("mean_device_accuracy") is not None]))
svg_lines("Mean device accuracy vs round (first seed)", "round", "mean device accuracy (%)", series,
          os.path.join(OUT, "accuracy_vs_round.svg"))
lines += ["Plot: `accuracy_vs_round.svg`.", ""]

# The generator of the first seed: its report, and its samples beside the real images.
gen = os.path.join(RUNS, "generated", "seed-0")
if os.path.exists(os.path.join(gen, "generator.json")):
    import shutil
    g = json.load(open(os.path.join(gen, "generator.json")))
    r, c = g["report"], g["classifier_check"]
    for f in ["samples.png", "held-out.png"]:
        shutil.copy(os.path.join(gen, f), os.path.join(OUT, f))
    lines += ["## The generator (first seed)", "",
              f"`flotilla generate --config examples/fedtsa.toml --set seed=0`: PCA with {g['options']['components']} components "
              f"({100*r['explained_variance']:.1f}% of the pixel variance, reconstruction MSE {r['reconstruction_mse']:.4f}), a denoiser of "
              f"{r['denoiser_parameters']:,} parameters trained {g['options']['steps']:,} steps (loss {r['loss_first']:.3f} → {r['loss_last']:.3f}); "
              f"fit {r['fit_wall_s']:.0f} s and {r['fit_flops']/1e9:.0f} GFLOP, {g['samples']:,} samples in {r['sample_wall_s']:.1f} s and "
              f"{r['sample_flops']/1e9:.0f} GFLOP (one-off costs, on a core shared with the experiment's runs).", "",
              f"Classifier check: the config's CNN trained 3 epochs on the 6,000 held-out images alone scores {100*c['test_accuracy']:.2f}% on the "
              f"test set (what the server's data is worth by itself) and labels {100*c['sample_accuracy']:.2f}% of the generated samples as "
              "their prompt's class.", "",
              "Generated (one row per class; columns cycle through guidance 1, 2, 4): ![samples](samples.png)", "",
              "Held-out images: ![held-out](held-out.png)", ""]
open(os.path.join(OUT, "README.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
