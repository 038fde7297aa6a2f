#!/usr/bin/env bash
# Sourced by every device script (`source "$(dirname "$0")/common.sh"`): moves to the
# repository root and sets MODE (the script's first argument, default gpu), OUT (the run
# tool's output folder) and DEV (.device, filled by prepare.sh); installs the carried wheels
# of what the device image lacks (grain, array_record, constriction, ml_collections) when
# they are missing, and puts the checkout and the carried data-only packages on PYTHONPATH.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODE=${1:-gpu}
OUT=${OUT:-/tmp/diffjax-device-out}
DEV=.device
export PYTHONUNBUFFERED=1
if ! python3 -c "import grain, constriction, ml_collections" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $DEV/whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:$PWD/$DEV/pylib:${PYTHONPATH:-}

# The shared data folder's layout (bsds500/{train,val}, video_*/, taesd/) over what
# prepare.sh carried in .device/data; exports DIFFJAX_DATA, which the configs read.
use_carried_data() {
  export DIFFJAX_DATA=$PWD/$DEV/data
  local split f
  for split in train val; do
    mkdir -p "$DIFFJAX_DATA/bsds500/$split"
    for f in "$DIFFJAX_DATA"/bsds500_trainval/${split}_*.jpg; do
      ln -sf "$f" "$DIFFJAX_DATA/bsds500/$split/${f##*/${split}_}"
    done
  done
}
