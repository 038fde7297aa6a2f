#!/usr/bin/env bash
# Launch `python -m experiments.train` on every host of a Cloud TPU VM (pod slice).
#
# Each host runs the same command; experiments/train.py calls jax.distributed.initialize()
# (--distributed=yes here), every host reads its own shard of the data
# (jax.process_index()/process_count()) and only process 0 writes metrics.jsonl.
# Checkpoints go to WORKDIR, which must be shared by all hosts (a gs:// bucket); running
# the same command again resumes from the latest checkpoint there.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: TPU=NAME ZONE=ZONE CONFIG=experiments/configs/NAME.py[:ARG] WORKDIR=gs://BUCKET/DIR \
         experiments/tpu/run.sh [--dry-run] [-- EXTRA_TRAIN_FLAGS...]

Runs `python -m experiments.train` on all workers of a TPU VM with
  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command=...

Required environment variables:
  TPU        name of the TPU VM (pod slice), e.g. my-v4-32
  ZONE       its zone, e.g. us-central2-b
  CONFIG     experiment config, e.g. experiments/configs/hyperprior.py:q3
  WORKDIR    checkpoint/metrics directory shared by all hosts, e.g. gs://my-bucket/runs/hp-q3

Optional environment variables:
  PROJECT       GCP project (default: gcloud's configured project)
  REPO_DIR      diffjax checkout on every TPU host (default: ~/diffjax)
  PYTHON        Python on the TPU hosts (default: python3)
  SETUP         shell command run first on every host, e.g.
                'git pull --ff-only && pip install -q -e .'  (default: none)
  DISTRIBUTED   --distributed value for experiments/train.py: yes (default), auto or no
  DETACH        1: run in the background with nohup (survives a dropped ssh session);
                output goes to $LOG on each host (default: 0, stream output here)
  LOG           log file on each host when DETACH=1 (default: ~/diffjax-train.log)
  SSH_FLAGS     extra flags for `gcloud compute tpus tpu-vm ssh`, e.g. --internal-ip

Arguments:
  --dry-run     print the gcloud command instead of running it
  -h, --help    show this help
  -- FLAGS...   passed on to experiments.train, e.g. -- --config.batch_size=256

Example:
  TPU=my-v4-32 ZONE=us-central2-b CONFIG=experiments/configs/hyperprior.py:q3 \
    WORKDIR=gs://my-bucket/runs/hp-q3 SETUP='cd ~/diffjax && git pull --ff-only' \
    experiments/tpu/run.sh -- --config.num_train_steps=500000

Notes: the TPU VM must already exist with diffjax and jax[tpu] installed on every host
(same checkout everywhere). If a previous run still holds the TPU ("TPU in use"), stop it
on all workers, e.g. with --command='pkill -f experiments.train' after checking what runs.
EOF
}

dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "run.sh: unknown argument '$1' (train flags go after --; see --help)" >&2; exit 2 ;;
  esac
done

missing=()
for var in TPU ZONE CONFIG WORKDIR; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "run.sh: missing environment variable(s): ${missing[*]} (see --help)" >&2
  exit 2
fi
DISTRIBUTED="${DISTRIBUTED:-yes}"
case "$DISTRIBUTED" in
  yes|auto|no) ;;
  *) echo "run.sh: DISTRIBUTED must be yes, auto or no, got '$DISTRIBUTED'" >&2; exit 2 ;;
esac
if [[ "$WORKDIR" != gs://* ]]; then
  echo "run.sh: warning: WORKDIR=$WORKDIR is not a gs:// path; every host must see the" \
       "same directory for checkpoints to work" >&2
fi

REPO_DIR="${REPO_DIR:-~/diffjax}"
PYTHON="${PYTHON:-python3}"
LOG="${LOG:-~/diffjax-train.log}"

# The command every host runs, with each argument shell-quoted (%q) for the remote bash.
train_cmd=$(printf '%q ' "$PYTHON" -m experiments.train "--config=$CONFIG" \
  "--workdir=$WORKDIR" "--distributed=$DISTRIBUTED" --progress=false "${extra[@]}")
# REPO_DIR and LOG may start with ~, which the remote shell must expand: quote the rest.
remote_dir="${REPO_DIR/#\~/\$HOME}"
remote_log="${LOG/#\~/\$HOME}"
remote="cd \"$remote_dir\""
if [[ -n "${SETUP:-}" ]]; then
  remote+=" && ( $SETUP )"
fi
if [[ "${DETACH:-0}" == 1 ]]; then
  remote+=" && nohup $train_cmd> \"$remote_log\" 2>&1 < /dev/null & echo \"started on \$(hostname), log: $remote_log\""
else
  remote+=" && $train_cmd"
fi

gcloud_cmd=(gcloud compute tpus tpu-vm ssh "$TPU" "--zone=$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_cmd+=("--project=$PROJECT")
fi
if [[ -n "${SSH_FLAGS:-}" ]]; then
  read -r -a ssh_flags <<<"$SSH_FLAGS"
  gcloud_cmd+=("${ssh_flags[@]}")
fi
gcloud_cmd+=("--command=$remote")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${gcloud_cmd[@]}"
  echo
  exit 0
fi
exec "${gcloud_cmd[@]}"
