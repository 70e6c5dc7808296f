#!/usr/bin/env bash
# Launch a jaxdit training run on a Cloud TPU VM slice (every host runs the same command).
#
#   tools/launch_tpu_vm.sh [--create] NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.x=y ...]
#
#   NAME         TPU VM name                       e.g. jaxdit-v5p-128
#   ZONE         its zone                          e.g. us-east5-a
#   ACCELERATOR  slice type                        e.g. v5p-128 (also used as mesh preset)
#   CONFIG       experiment config                 e.g. experiments/dit_air.py:XL
#   WORKDIR      checkpoint/metrics directory on a filesystem every host shares: an NFS /
#                Filestore mount or a Cloud Storage bucket mounted with gcsfuse on every
#                worker (e.g. /gcs/my-bucket/runs/xl); jaxdit writes it with plain file
#                I/O, so gs:// URLs are not accepted
#   --create     create the TPU VM first (runtime $TPU_RUNTIME, default v2-alpha-tpuv5)
#
# Steps: (optionally) create the VM, copy this checkout (git archive of HEAD) to every
# worker, install it in a venv (`pip install -e .` plus jax[tpu]), then start training on
# all workers at once. jax.distributed finds the coordinator on TPU VMs by itself
# (jaxdit/parallel/distributed.py); data are sharded per host by the input pipeline. The
# mesh defaults to the slice's preset (fsdp over all chips); pass --config.mesh.tensor=4
# etc. to change it. Re-running the command resumes from the latest checkpoint in WORKDIR,
# so it is also the restart command after a preemption (SIGTERM saves a checkpoint first).
set -euo pipefail

CREATE=0
if [[ "${1:-}" == "--create" ]]; then CREATE=1; shift; fi
if [[ $# -lt 5 ]]; then
  sed -n '2,20p' "$0"; exit 2
fi
NAME=$1; ZONE=$2; ACCEL=$3; CONFIG=$4; WORKDIR=$5; shift 5
EXTRA=("$@")
RUNTIME=${TPU_RUNTIME:-v2-alpha-tpuv5}
REPO_DIR=jaxdit
cd "$(dirname "$0")/.."

if [[ "$WORKDIR" != /* ]]; then
  echo "WORKDIR must be an absolute path on a filesystem shared by all hosts (an NFS or" \
       "gcsfuse mount), got $WORKDIR." >&2
  exit 2
fi
if ! command -v gcloud >/dev/null; then
  echo "gcloud is not installed; see https://cloud.google.com/sdk/docs/install" >&2
  exit 2
fi

if [[ $CREATE == 1 ]]; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" \
    --version "$RUNTIME"
fi

ARCHIVE=$(mktemp -t jaxdit-XXXX.tar.gz)
trap 'rm -f "$ARCHIVE"' EXIT
git archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME":jaxdit.tar.gz --zone "$ZONE" --worker=all

SETUP="set -e; mkdir -p $REPO_DIR && tar -xzf jaxdit.tar.gz -C $REPO_DIR && cd $REPO_DIR && \
python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$SETUP"

QUOTED=$(printf ' %q' "${EXTRA[@]+"${EXTRA[@]}"}")
RUN="cd $REPO_DIR && . .venv/bin/activate && python -m jaxdit.train --config $CONFIG \
--workdir $WORKDIR --config.mesh.preset=$ACCEL$QUOTED 2>&1 | tee -a train.log"
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$RUN"
