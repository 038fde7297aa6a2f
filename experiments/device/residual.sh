#!/usr/bin/env bash
# Train the default codec (residual diffusion codec) on a lent GPU in under 8 minutes and
# return the result through $OUT: a base stage then an enhance stage (the model card's
# staging), both from the shipped weights' widths (`residual.py:gpu,shipped`: 256 px crops,
# batch 16, Adam 1e-4), each stopped by wall time with an Orbax checkpoint, then exported.
#
#   experiments/device/prepare.sh           # once, here: fills the ignored .device/ folder
#   run tool: command "experiments/device/residual.sh",
#             carry [".device/whl", ".device/pylib", ".device/data/bsds500_trainval"], timeout 600
#   experiments/device/residual.sh smoke    # here, on the CPU: the tiny config, seconds
#
# $OUT/residual-gpu is a model folder (model.json + params.msgpack): try it with
#   diffjax compress photo.png --model $OUT/residual-gpu
# and rerun the Kodak bench of the model card before shipping it.
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"
DATA=$DEV/data/bsds500_trainval
WORK=${WORK:-/tmp/diffjax-device-runs}
case $MODE in
  gpu)   CFG=gpu,shipped; INIT=(--config.init_from=diffjax/weights/residual)
         LIMITS=(--stop_after_minutes=4.5); LIMITS2=(--stop_after_minutes=2.3) ;;
  smoke) CFG=smoke; INIT=(); LIMITS=(--stop_after=2); LIMITS2=(--stop_after=2)
         [ -d "$DATA" ] || DATA=../shared/data/bsds500/train ;;
  *) echo "usage: $0 [gpu|smoke]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
python3 -c "import jax; print('devices:', jax.devices())" | tee "$OUT/log.txt"
python3 -m experiments.train --config=experiments/configs/residual.py:$CFG,base \
  --workdir="$WORK/base" --config.data.path="$DATA" "${INIT[@]}" "${LIMITS[@]}" \
  --progress=false 2>&1 | tee -a "$OUT/log.txt"
python3 -m experiments.train --config=experiments/configs/residual.py:$CFG,enhance \
  --workdir="$WORK/enhance" --config.data.path="$DATA" --config.init_from="$WORK/base" \
  "${LIMITS2[@]}" --progress=false 2>&1 | tee -a "$OUT/log.txt"
python3 -m experiments.export --workdir "$WORK/enhance" --out "$OUT/residual-gpu" --overwrite \
  --note "device_run=experiments/device/residual.sh $MODE" 2>&1 | tee -a "$OUT/log.txt"
cp "$WORK/base/metrics.jsonl" "$OUT/base_metrics.jsonl"
cp "$WORK/enhance/metrics.jsonl" "$OUT/enhance_metrics.jsonl"
echo "done: $OUT/residual-gpu"
