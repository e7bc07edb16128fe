#!/usr/bin/env bash
# FeDLRT against FedAvg and FedLin on Fashion-MNIST (784-512-512-10 MLP, 30,000 training images,
# every client in every round), as docs/results/fedlrt/README.md reports it:
#   iid-16        16 IID clients: FedAvg, FedLin, FeDLRT with vc = none / simplified / full,
#                 and the corrected ones again with the gradient pass on 4 batches (-g4)
#   dirichlet-32  32 Dirichlet(0.5) clients: the same eight
#   dirichlet-32-lr0.05  the five without ablations at lr 0.05 instead of 0.2
#   iid-4/8/32    FedAvg and FeDLRT (simplified) for the scaling with the number of clients
# Writes runs under runs/fedlrt/ and the tables and plots under docs/results/fedlrt/.
#   scripts/fedlrt_experiment.sh [ROUNDS]        (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-30}
# FLOTILLA: a prebuilt binary to use instead of building target/release/flotilla.
flotilla=${FLOTILLA:-target/release/flotilla}
[ -n "${FLOTILLA:-}" ] || cargo build --release -q -p flotilla
common=(--set "rounds=$rounds" --set evaluation.every=2 --set simulation.checkpoint_every=0)
run() { # SETTING METHOD CLIENTS PARTITION [--set ...]
  local setting=$1 method=$2 clients=$3 partition=$4
  shift 4
  local out=runs/fedlrt/$setting/$method
  [ -e "$out/summary.json" ] && return
  local config=examples/fedlrt.toml name=$method
  # METHOD-g4: the gradient pass on 4 batches instead of the default (an ablation).
  if [[ $name == *-g4 ]]; then
    name=${name%-g4}
    set -- "$@" --set method.grad_batches=4
  fi
  case $name in
    fedavg) config=examples/fedlrt-baseline.toml ;;
    fedlin) config=examples/fedlrt-baseline.toml
            set -- "$@" --set 'method.name="fedlin"' ;;
    fedlrt-*) set -- "$@" --set "method.vc=\"${name#fedlrt-}\"" ;;
  esac
  mkdir -p "$(dirname "$out")"
  $flotilla simulate --config "$config" --out "$out" "${common[@]}" \
    --set "data.num_clients=$clients" --set "sampling.clients_per_round=$clients" \
    --set "data.partition=$partition" "$@"
}
iid='{ kind = "iid" }'
dirichlet='{ kind = "dirichlet", alpha = 0.5 }'
for m in fedavg fedlin fedlrt-none fedlrt-simplified fedlrt-full fedlin-g4 fedlrt-simplified-g4 fedlrt-full-g4; do
  run iid-16 $m 16 "$iid"
  run dirichlet-32 $m 32 "$dirichlet"
done
# The corrected methods at the smaller step the theory asks for (λ ≲ 1/(L·s*)).
for m in fedavg fedlin fedlrt-none fedlrt-simplified fedlrt-full; do
  run dirichlet-32-lr0.05 $m 32 "$dirichlet" --set training.lr=0.05
done
for c in 4 8 32; do
  for m in fedavg fedlrt-simplified; do run "iid-$c" $m $c "$iid"; done
done
python3 scripts/fedlrt_table.py runs/fedlrt docs/results/fedlrt
mkdir -p docs/results/fedlrt/runs
for d in runs/fedlrt/*/*/; do
  rel=${d#runs/fedlrt/}
  mkdir -p "docs/results/fedlrt/runs/$rel"
  cp "$d"/config.toml "$d"/metrics.jsonl "$d"/summary.json "docs/results/fedlrt/runs/$rel"
done
