#!/usr/bin/env bash
# The shape of FlexTrain's Table 4 and Figure 2 (methods.md §3.5–3.6) on Fashion-MNIST:
# federated FlexTrain vs FedSmall vs FedClass on the 20-device capability table of
# examples/flextrain.toml (ResNet-20 at width 0.5, depths chosen by the planner from memory).
# Writes runs under runs/<config name>/<ROUNDS>-rounds/ and the table and plots under
# docs/results/<config name>/<ROUNDS>-rounds/.
#   scripts/flextrain_experiment.sh [ROUNDS] [TRAIN_LIMIT]   (default 20 rounds, 20000 samples:
#   1,000 per device, 1 local epoch; about 25 minutes on 2 cores)
# CIFAR-10: FLOTILLA_CONFIG=examples/flextrain-cifar10.toml FLOTILLA_DATA=/path/to/cifar-10-batches-bin
#   scripts/flextrain_experiment.sh 20 50000
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-20}
limit=${2:-20000}
config=${FLOTILLA_CONFIG:-examples/flextrain.toml}
name=$(basename "$config" .toml)/$rounds-rounds
flotilla=target/release/flotilla
cargo build --release -q -p flotilla
common=(--set "rounds=$rounds" --set "data.train_limit=$limit" --set evaluation.every=5 --set simulation.checkpoint_every=0)
mkdir -p runs/$name docs/results/$name
$flotilla plan --config "$config" | tee runs/$name/plan.txt
for m in flextrain fedsmall fedclass; do
  out=runs/$name/$m
  [ -e "$out/summary.json" ] || $flotilla simulate --config "$config" --out "$out" "${common[@]}" --set "method.name=\"$m\""
done
# The holders-only aggregation option (methods.md §3.8.5), for comparison.
[ -e runs/$name/flextrain-holders/summary.json ] || $flotilla simulate --config "$config" --out runs/$name/flextrain-holders "${common[@]}" --set 'method.aggregation="holders"'
python3 scripts/flextrain_table.py runs/$name docs/results/$name
