#!/usr/bin/env bash
# Multi-host GPU cluster under SLURM: one process per node (all local GPUs), e.g.
#
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_slurm.sh \
#       configs/cifar10_adm_at.py /shared/runs/cifar10_at /shared/tfds [extra flags...]
#
# jax.distributed.initialize() reads the SLURM environment by itself (--distributed). Without
# SLURM, set the coordinator explicitly on every host instead (see docs/scale.md).
#SBATCH --job-name=atdiff
#SBATCH --ntasks-per-node=1
set -euo pipefail
CONFIG=${1:?usage: gpu_slurm.sh CONFIG WORKDIR DATA_DIR [flags...]}
WORKDIR=${2:?}
DATA_DIR=${3:?}
shift 3
cd "${SLURM_SUBMIT_DIR:-.}"
. .venv/bin/activate   # created once with: pip install -c requirements-lock.txt -e . 'jax[cuda12]'
srun atdiff train --distributed --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.data_dir="$DATA_DIR" "$@"
