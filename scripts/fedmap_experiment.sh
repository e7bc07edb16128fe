#!/usr/bin/env bash
# FedMap against its baselines on W1 (FedAvg CNN, Fashion-MNIST, 100 clients, 10 per round),
# IID and Dirichlet(0.5): dense FedAvg, FedMap (nested), non-nested recompute, one-shot.
# Writes runs under runs/fedmap/ and the comparison (table + plots) under docs/results/fedmap/.
#   scripts/fedmap_experiment.sh [ROUNDS]        (default 40: about 1 hour on 2 cores)
# The schedule is shortened from examples/fedmap.toml to fit the budget: warm-up 5 rounds,
# an event every 3 rounds, p_G = 0.2, so 90% sparsity is reached at round 35.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-40}
flotilla=target/release/flotilla
cargo build --release -q -p flotilla
common=(--set "rounds=$rounds" --set evaluation.every=4 --set evaluation.per_client=true --set data.holdout=0.1 --set simulation.checkpoint_every=0)
schedule=(--set method.warmup=5 --set method.period=3 --set method.rate=0.2 --set method.target_sparsity=0.9)
for part in iid dirichlet; do
  if [ "$part" = iid ]; then p=(--set 'data.partition={ kind = "iid" }'); else p=(); fi
  out=runs/fedmap/$part
  mkdir -p "$out"
  [ -e "$out/dense/summary.json" ] || $flotilla simulate --config examples/w1.toml --out "$out/dense" "${common[@]}" "${p[@]}"
  for v in nested recompute one-shot; do
    [ -e "$out/$v/summary.json" ] || $flotilla simulate --config examples/fedmap.toml --out "$out/$v" "${common[@]}" "${schedule[@]}" "${p[@]}" --set "method.variant=\"$v\""
  done
done
python3 scripts/fedmap_table.py runs/fedmap docs/results/fedmap
