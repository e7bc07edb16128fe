#!/usr/bin/env bash
# W1 over the network against `flotilla simulate`: the W1 config with 10 clients, all sampled
# every round, 5 rounds. The simulation runs first; then a server and 10 client processes on
# loopback (plaintext, this machine only). Prints both accuracy trajectories side by side and
# whether every learning metric and the final model are identical. Takes about 10 minutes on
# 2 cores. Usage: scripts/network_w1_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p flotilla
bin=target/release/flotilla
out=${1:-runs/w1-network}
rm -rf "$out"
mkdir -p "$out"
sets=(--set rounds=5 --set data.num_clients=10 --set sampling.clients_per_round=10 --set server.min_clients=10)
$bin simulate --config examples/w1.toml --out "$out/simulated" "${sets[@]}" 2> "$out/simulate.log"
$bin serve --config examples/w1.toml --state "$out/served" --listen 127.0.0.1:0 --insecure \
  "${sets[@]}" 2> "$out/server.log" &
until [ -s "$out/served/address" ]; do sleep 0.2; done
addr=$(cat "$out/served/address")
for k in $(seq 0 9); do
  $bin join --server "http://$addr" --partition "$k/10" --threads 1 > /dev/null 2> "$out/client-$k.log" &
done
wait
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def load(d):
    return [json.loads(l) for l in open(f"{out}/{d}/metrics.jsonl")]
sim, net = load("simulated"), load("served")
print("| round | simulate accuracy | network accuracy | simulate train loss | network train loss |")
print("|---|---|---|---|---|")
for a, b in zip(sim, net):
    print(f"| {a['round']} | {a['test_accuracy']:.4f} | {b['test_accuracy']:.4f} | {a['train_loss']:.6f} | {b['train_loss']:.6f} |")
keys = ["round", "test_accuracy", "test_loss", "train_loss", "clients", "flops"]
same = len(sim) == len(net) and all(a[k] == b[k] for a, b in zip(sim, net) for k in keys)
model = open(f"{out}/simulated/model.safetensors", "rb").read() == open(f"{out}/served/model.safetensors", "rb").read()
print(f"identical metrics ({', '.join(keys)}): {same}; byte-identical model.safetensors: {model}")
for d in ("simulated", "served"):
    w = sum(r["wall_time_s"] for r in load(d))
    up = sum(r["bytes_up"] for r in load(d))
    print(f"{d}: wall {w:.1f} s, uplink {up} bytes")
PY
