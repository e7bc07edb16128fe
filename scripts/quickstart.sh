#!/usr/bin/env bash
# Installs the Fashion-MNIST Debian package if it is missing, then runs the quickstart:
# FedAvg on Fashion-MNIST over 100 simulated clients (about a minute on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${FLOTILLA_DATA:-}" ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi
cargo run --release -q -p flotilla -- simulate --config examples/quickstart.toml "$@"
