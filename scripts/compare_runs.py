#!/usr/bin/env python3
"""Runs the same configs with two flotilla binaries and reports what differs.

Usage: scripts/compare_runs.py OLD_BINARY NEW_BINARY [CONFIG[:ROUNDS] ...]

For each config, both binaries run `simulate` into a temporary folder; the script then
compares metrics.jsonl round by round (wall-clock fields, which no two runs share, are left
out) and the saved models byte for byte, and prints every difference. Exits 1 if any
accuracy, loss or model differs.
"""
import json, os, subprocess, sys, tempfile

WALL = {"wall_time_s", "train_wall_s", "eval_wall_s", "overhead_s", "server_wall_s"}
DEFAULT = ["examples/quickstart.toml", "examples/fedmap.toml:5", "examples/flextrain.toml:5"]


def run(binary, config, rounds, out):
    cmd = [binary, "simulate", "--config", config, "--out", out]
    if rounds:
        cmd += ["--set", f"rounds={rounds}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        model = f.read()
    return metrics, model


def main():
    old, new, *configs = sys.argv[1:]
    failed = False
    for spec in configs or DEFAULT:
        config, _, rounds = spec.partition(":")
        with tempfile.TemporaryDirectory() as tmp:
            a, model_a = run(old, config, rounds, os.path.join(tmp, "old"))
            b, model_b = run(new, config, rounds, os.path.join(tmp, "new"))
        print(f"{spec}: {len(a)} rounds; final test_accuracy old {a[-1]['test_accuracy']:.4f} "
              f"new {b[-1]['test_accuracy']:.4f}; model {'identical' if model_a == model_b else 'DIFFERS'}")
        failed |= model_a != model_b or len(a) != len(b)
        # Per metric: in how many rounds it differs, and by how much at most.
        diffs = {}
        for ra, rb in zip(a, b):
            for key in sorted(set(ra) | set(rb)):
                va, vb = ra.get(key), rb.get(key)
                if key in WALL or va == vb:
                    continue
                n, worst = diffs.get(key, (0, ""))
                if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                    worst = max(worst or 0, abs(va - vb))
                else:
                    worst = f"old {va} new {vb}"
                diffs[key] = (n + 1, worst)
                failed |= key in ("test_accuracy", "test_loss", "train_loss")
        for key, (n, worst) in sorted(diffs.items()):
            print(f"  {key}: differs in {n} of {len(a)} rounds; largest difference {worst}")
    sys.exit(1 if failed else 0)


main()
