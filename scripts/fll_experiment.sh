#!/usr/bin/env bash
# FLL + depth dropout against end-to-end FedSSL on Fashion-MNIST (ViT patch 7, width 96, 4
# heads; SimCLR NT-Xent; 20 clients of 1,000 images, 10 per round), as
# docs/results/fll/README.md reports it:
#   iid/        fedssl; fll with depth dropout p = 0, 0.25, 0.5, 0.75; fll p = 0 without the
#               frozen-block cache (bytes only differ)
#   dirichlet/  fedssl and fll (p = 0) on a Dirichlet(0.5) label partition
#   depth4/     fedssl and fll at depth 4, one round each: the memory ratio's dependence on depth
# Writes runs under runs/fll/ and the tables and plots under docs/results/fll/.
#   scripts/fll_experiment.sh [ROUNDS]        (default 16: 2 rounds per stage at depth 8)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-16}
# FLOTILLA: a prebuilt binary to use instead of building target/release/flotilla.
flotilla=${FLOTILLA:-target/release/flotilla}
[ -n "${FLOTILLA:-}" ] || cargo build --release -q -p flotilla
common=(--set simulation.checkpoint_every=0)
run() { # SETTING NAME CONFIG [--set ...]
  local out=runs/fll/$1/$2 config=$3
  shift 3
  [ -e "$out/summary.json" ] && return
  mkdir -p "$(dirname "$out")"
  $flotilla simulate --config "$config" --out "$out" "${common[@]}" "$@"
}
iid='data.partition={ kind = "iid" }'
dirichlet='data.partition={ kind = "dirichlet", alpha = 0.5 }'
r=(--set "rounds=$rounds")
run iid fedssl examples/fedssl.toml "${r[@]}" --set "$iid"
for p in 0 0.25 0.5 0.75; do
  run iid "fll-dd$p" examples/fll.toml "${r[@]}" --set "$iid" --set "method.dd_rate=$p"
done
run iid fll-dd0-nocache examples/fll.toml "${r[@]}" --set "$iid" --set method.cache_frozen=false
run dirichlet fedssl examples/fedssl.toml "${r[@]}" --set "$dirichlet"
run dirichlet fll-dd0 examples/fll.toml "${r[@]}" --set "$dirichlet"
one=(--set rounds=1 --set model.depth=4 --set "$iid")
run depth4 fedssl examples/fedssl.toml "${one[@]}"
run depth4 fll-dd0 examples/fll.toml "${one[@]}"
python3 scripts/fll_table.py runs/fll docs/results/fll
mkdir -p docs/results/fll/runs
for d in runs/fll/*/*/; do
  rel=${d#runs/fll/}
  mkdir -p "docs/results/fll/runs/$rel"
  cp "$d"/config.toml "$d"/metrics.jsonl "$d"/clients.jsonl "$d"/summary.json "docs/results/fll/runs/$rel"
done
