#!/usr/bin/env python3
"""Builds docs/results/flextrain/README.md (tables) and SVG plots from the runs of
scripts/flextrain_experiment.sh. Standard library only."""
import json
import os
import re
import sys

RUNS, OUT = sys.argv[1], sys.argv[2]
METHODS = ["flextrain", "fedsmall", "fedclass", "flextrain-holders"]
LABEL = {"flextrain": "FlexTrain", "fedsmall": "FedSmall", "fedclass": "FedClass",
         "flextrain-holders": "FlexTrain (holders-only averaging)"}
COLORS = {"flextrain": "#d62728", "fedsmall": "#1f77b4", "fedclass": "#2ca02c", "flextrain-holders": "#9467bd"}
os.makedirs(OUT, exist_ok=True)


def rows(m):
    return [json.loads(l) for l in open(os.path.join(RUNS, m, "metrics.jsonl")) if l.strip()]


def clients(m):
    return [json.loads(l) for l in open(os.path.join(RUNS, m, "clients.jsonl")) if l.strip()]


def svg_lines(title, xlabel, ylabel, series, path):
    """series: [(label, color, [(x, y), ...])]"""
    W, H, L, B, T, R = 700, 400, 70, 50, 40, 270
    pts = [p for _, _, s in series for p in s]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    sy = lambda y: H - B - (y - y0) / (y1 - y0) * (H - B - T)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{(W - R + L) / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
           f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
           f'<text x="{(L+W-R)/2}" y="{H-12}" text-anchor="middle">{xlabel}</text>',
           f'<text x="16" y="{(T+H-B)/2}" text-anchor="middle" transform="rotate(-90 16 {(T+H-B)/2})">{ylabel}</text>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{sx(xv)}" y="{H-B+16}" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{L-6}" y="{sy(yv)+4}" text-anchor="end">{yv:.3g}</text>')
    for k, (label, color, s) in enumerate(series):
        s = sorted(s)
        d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(s))
        out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in s:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>')
        out.append(f'<line x1="{W-R+15}" y1="{T+10+18*k}" x2="{W-R+35}" y2="{T+10+18*k}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{W-R+40}" y="{T+14+18*k}">{label}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out))


methods = [m for m in METHODS if os.path.exists(os.path.join(RUNS, m, "summary.json"))]
# Capability classes from the planner's output: tier -> (devices, depth).
tiers = {}
for line in open(os.path.join(RUNS, "plan.txt")):
    m = re.match(r"(\S+)\s+(\d+)\s+([\d.]+)\s+train depth (\d+)/(\d+)", line)
    if m:
        tiers[m.group(1)] = (int(m.group(2)), int(m.group(4)), float(m.group(3)))
blocks = int(re.search(r"depth \d+/(\d+)", open(os.path.join(RUNS, "plan.txt")).read()).group(1))
# Share of the model's parameters in each class's prefix: what the planner sends it.
total = json.load(open(os.path.join(RUNS, "flextrain", "summary.json")))["model_parameters"]
share = {}
for line in open(os.path.join(RUNS, "plan.txt")):
    m = re.search(r"train depth (\d+)/\d+, \d+ tensors, (\d+) parameters sent", line)
    if m:
        share[int(m.group(1))] = int(m.group(2)) / total
classes = sorted({d for _, d, _ in tiers.values()})
devices = {d: sum(n for n, dd, _ in tiers.values() if dd == d) for d in classes}


def final(m):
    r = [x for x in rows(m) if x.get("test_accuracy") is not None][-1]
    per = {d: r.get(f"test_accuracy/depth-{d}", r["test_accuracy"]) for d in classes}
    return r, per


lines = ["# FlexTrain: the shape of the paper's Table 4 and Figure 2", "",
         "Produced by `scripts/flextrain_experiment.sh` (config `examples/flextrain.toml`, overrides in the script),",
         "tables and plots by `scripts/flextrain_table.py`. The paper's setup is CIFAR-10/100 on ResNet-56 (27 blocks),",
         "160 rounds × 10 local epochs; here the same 20-device capability table is mapped to a ResNet-20 at width 0.5",
         f"(9 blocks, 67,906 parameters) so that it runs on 2 CPU cores: {clients('flextrain')[0]['num_examples']:,} examples per device, 1 local",
         "epoch per round. The depths come from the planner (memory budgets per tier, see the planner output below).",
         "Wall times are of runs that shared the 2 cores with other work: compare them only loosely.", ""]
s0 = json.load(open(os.path.join(RUNS, methods[0], "summary.json")))
n_dev = sum(n for n, _, _ in tiers.values())
lines += [f"Rounds: {s0['rounds']}, seed {s0['seed']}, all {n_dev} devices every round. Command: "
          f"`scripts/flextrain_experiment.sh {s0['rounds']} {n_dev * clients('flextrain')[0]['num_examples']}`; "
          "the runs' config, metrics, per-client records and summaries are kept in `runs/` beside this file.", ""]
lines += ["## Mean device accuracy (Table 4 shape)", "",
          "Each device is evaluated on the 10,000 test images with the model it deploys (the deepest prefix it can host); the mean is over the 20 devices.", "",
          "| method | mean device accuracy | " + " | ".join(f"depth {d} ({100*share[d]:.1f} %, {devices[d]} dev.)" for d in classes) + " | uplink MB total | wall time s |",
          "|---|---|" + "---|" * len(classes) + "---|---|"]
for m in methods:
    r, per = final(m)
    s = json.load(open(os.path.join(RUNS, m, "summary.json")))
    lines.append(f"| {LABEL[m]} | **{100*s['final_mean_device_accuracy']:.2f}** | " + " | ".join(f"{100*per[d]:.2f}" for d in classes)
                 + f" | {s['total_bytes_up']/1e6:.1f} | {s['wall_time_s']:.0f} |")
lines += ["", "Paper (CIFAR-10, ResNet-56): FlexTrain 83, FedSmall 81, FedClass 78.9.", ""]

# Figure 2: accuracy vs share of the model a device can host.
series = []
for m in methods:
    _, per = final(m)
    series.append((LABEL[m], COLORS[m], [(100 * share[d], 100 * per[d]) for d in classes]))
svg_lines("Device accuracy vs share of the model it can host", "parameters the device can host (%)", "test accuracy (%)",
          series, os.path.join(OUT, "accuracy_vs_capability.svg"))
series = []
for m in methods:
    series.append((LABEL[m], COLORS[m], [(r["round"], 100 * r["test_accuracy"]) for r in rows(m) if r.get("test_accuracy") is not None]))
svg_lines("Mean device accuracy vs round", "round", "mean device accuracy (%)", series, os.path.join(OUT, "accuracy_vs_round.svg"))
lines += ["Plots: `accuracy_vs_capability.svg` (the paper's Figure 2), `accuracy_vs_round.svg`.", ""]

# Resources per capability class, measured in the FlexTrain run.
cl = [c for c in clients("flextrain") if c["status"] == "ok"]
tier_depth = {t: d for t, (_, d, _) in tiers.items()}
agg = {}
for c in cl:
    d = tier_depth[c["tier"]]
    a = agg.setdefault(d, {"n": 0, "up": 0, "down": 0, "flops": 0, "peak": 0, "est": 0, "wall": 0})
    a["n"] += 1
    a["up"] += c["bytes_up"]
    a["down"] += c["bytes_down"]
    a["flops"] += c["flops"]
    a["peak"] = max(a["peak"], c["peak_memory_bytes"])
    a["est"] = max(a["est"], c["estimated_memory_bytes"])
    a["wall"] += c["wall_time_s"]
full = agg[max(agg)]
mean = lambda a, k: a[k] / a["n"]
lines += ["## Resources per device and round, by depth (FlexTrain run, measured)", "",
          "Bytes are measured on the encoded messages; peak memory is the heap high-water mark of local training from the",
          "counting allocator (the planner's estimate beside it); FLOPs come from the per-layer formulas; wall time is measured.", "",
          "| depth | params hosted | down KB | up KB | up / full | GFLOP | FLOPs / full | peak MiB (est.) | peak / full | train s | time / full |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
for d in sorted(agg):
    a = agg[d]
    lines.append(f"| {d} | {100*share[d]:.1f} % | {mean(a,'down')/1e3:.1f} | {mean(a,'up')/1e3:.1f} | {mean(a,'up')/mean(full,'up'):.3f} | "
                 f"{mean(a,'flops')/1e9:.1f} | {mean(a,'flops')/mean(full,'flops'):.3f} | {a['peak']/2**20:.1f} ({a['est']/2**20:.1f}) | "
                 f"{a['peak']/full['peak']:.3f} | {mean(a,'wall'):.2f} | {mean(a,'wall')/mean(full,'wall'):.3f} |")
r_last = rows("flextrain")[-1]
up_ratio = sum(c["bytes_up"] for c in cl) / (len(cl) * mean(full, "up"))
wall_ratio = sum(c["wall_time_s"] for c in cl) / (len(cl) * mean(full, "wall"))
lines += ["", "Expected share of the model a device trains (methods.md §3.2, π = the fleet's depth shares):", "",
          f"- r̄ from parameter counts (the paper's formula): **{r_last['expected_param_fraction']:.3f}**;",
          f"  measured as uplink bytes relative to a full-depth device: **{up_ratio:.3f}** (the difference is the message envelope).",
          f"- share of training FLOPs (per-layer formula): **{r_last['expected_flop_fraction']:.3f}**;",
          f"  measured as training wall time relative to a full-depth device: **{wall_ratio:.3f}**.",
          "- The paper equates compute with parameters. In a CIFAR-style ResNet every block costs about the same FLOPs",
          "  (channels double as the resolution halves) while parameters grow 4× per stage, so shallow prefixes cost a much",
          "  larger share of FLOPs than of parameters: the parameter-based r̄ understates the compute of weak devices.", ""]
lines += ["## Planner output", "", "```", open(os.path.join(RUNS, "plan.txt")).read().rstrip(), "```", ""]
open(os.path.join(OUT, "README.md"), "w").write("\n".join(lines) + "\n")
# Keep what the tables came from, so they can be rebuilt and checked without rerunning.
import shutil
for m in methods:
    dst = os.path.join(OUT, "runs", m)
    os.makedirs(dst, exist_ok=True)
    for f in ["config.toml", "metrics.jsonl", "summary.json", "clients.jsonl"]:
        shutil.copy(os.path.join(RUNS, m, f), dst)
shutil.copy(os.path.join(RUNS, "plan.txt"), os.path.join(OUT, "runs"))
print("\n".join(lines))
