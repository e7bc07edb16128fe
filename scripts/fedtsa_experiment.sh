#!/usr/bin/env bash
# FedTSA against its baselines on examples/fedtsa.toml (Fashion-MNIST, thirty devices in three
# memory tiers, Dirichlet 0.5, the W1 CNN at width 0.5 and its 1/2 and 1/4 slices), as
# docs/results/fedtsa/README.md reports it. Per seed:
#   fedtsa, fedtsa-stage1, feddf, heterofl, fedrolex, fedavg-smallest   the comparison
#   fedtsa-narrow, fedtsa-stage1-narrow   the ladder {1, 3/4, 1/2} on a fleet whose tiers afford it
#   fedtsa-generated   stage 2 on 5,000 images of the generator fitted on the held-out slice
#                      (flotilla generate; the clients keep the same data)
#   fedtsa-noise   stage 2 on data-free noise-mixup images instead of the held-out images
# Writes runs under runs/fedtsa/<ROUNDS>-rounds/ and the tables under docs/results/fedtsa/.
#   scripts/fedtsa_experiment.sh [ROUNDS]   (default 40; SEEDS="0 1 2"; about 2 minutes a run)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-40}
seeds=${SEEDS:-0 1 2}
# FLOTILLA: a prebuilt binary to use instead of building target/release/flotilla.
flotilla=${FLOTILLA:-target/release/flotilla}
[ -n "${FLOTILLA:-}" ] || cargo build --release -q -p flotilla
base=runs/fedtsa/$rounds-rounds
common=(--set "rounds=$rounds" --set simulation.checkpoint_every=0)
mkdir -p "$base" docs/results/fedtsa
noise=$base/noise-images-idx3-ubyte
[ -e "$noise" ] || python3 scripts/fedtsa_noise.py "$noise" 5000
run() { # NAME SEED [--set ...]
  local name=$1 seed=$2
  shift 2
  local out=$base/$name/seed-$seed
  [ -e "$out/summary.json" ] && return
  $flotilla simulate --config examples/fedtsa.toml --out "$out" "${common[@]}" --set "seed=$seed" "$@"
}
narrow=(--set 'method.widths=[1.0, 0.75, 0.5]' --set 'fleet.csv="examples/fedtsa-fleet-narrow.csv"')
for seed in $seeds; do
  for m in fedtsa fedtsa-stage1 feddf heterofl fedrolex fedavg-smallest; do
    run $m "$seed" --set "method.name=\"$m\""
  done
  gen=$base/generated/seed-$seed
  [ -e "$gen/generator.json" ] || $flotilla generate --config examples/fedtsa.toml --set "seed=$seed" --out "$gen"
  idx=(--set 'server_data.source="idx"' --set server_data.withhold=6000 --set server_data.size=5000)
  run fedtsa-generated "$seed" "${idx[@]}" --set "server_data.images=\"$gen/images-idx3-ubyte\""
  run fedtsa-narrow "$seed" "${narrow[@]}"
  run fedtsa-stage1-narrow "$seed" "${narrow[@]}" --set 'method.name="fedtsa-stage1"'
  run fedtsa-noise "$seed" "${idx[@]}" --set "server_data.images=\"$noise\""
done
python3 scripts/fedtsa_table.py "$base" docs/results/fedtsa
