#!/usr/bin/env bash
# Cloud TPU pod (TPU VM): run the same command on every worker. jax.distributed.initialize()
# discovers the pod by itself (--distributed), every host feeds its slice of the global batch and
# takes part in every checkpoint save, so the workdir must be on a file system every worker
# mounts (e.g. a Filestore NFS share; gs:// URLs are not supported for the workdir) and every
# worker must read data_dir (see docs/scale.md).
#
#   TPU_NAME=my-pod ZONE=us-central2-b WORKDIR=/mnt/shared/runs/cifar10_at \
#   DATA_DIR=/mnt/shared/tfds bash launch/tpu_pod.sh configs/cifar10_adm_at.py [extra flags...]
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${DATA_DIR:?set DATA_DIR}"
CONFIG=${1:?usage: launch/tpu_pod.sh CONFIG [flags...]}
shift
REPO=${REPO:-https://example.invalid/atdiff_jax.git}  # where the workers get the code from
EXTRA=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  if [ ! -d atdiff_jax ]; then git clone $REPO atdiff_jax; fi
  cd atdiff_jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -c requirements-lock.txt -e . 'jax[tpu]'
  atdiff train --distributed --config=$CONFIG --workdir=$WORKDIR --config.data.data_dir=$DATA_DIR $EXTRA
"
