#!/usr/bin/env bash
# Train the residual video codec's refiner (issue 28; Brenig & Timofte, video) on a lent GPU
# within 8 minutes and return the result through $OUT: `residual_video.py:gpu` (the shipped
# image refiner's widths, started from diffjax/weights/residual with the new input rows at
# zero; x265 backbone at random CRFs, 3-frame windows, the 10-step sampler in the loop),
# stopped by wall time with an Orbax checkpoint, then exported.
#
#   experiments/device/prepare.sh     # once, here: fills .device/ and builds the x265 cache
#                                     # .device/video_cache (the device has no ffmpeg or PyAV)
#   run tool: command "experiments/device/residual_video.sh", timeout 600,
#             carry [".device/whl", ".device/pylib", ".device/video_cache"]
#   experiments/device/residual_video.sh smoke   # here, on the CPU: the tiny config, 2 + 2
#                                                # steps (a stop and a resume), then export
#
# $OUT/residual-video-gpu is a model folder: try it with
#   diffjax compress clip.mp4 --codec residual-video --crf 30 --model $OUT/residual-video-gpu
# and run the evaluation of issue 28 (experiments/eval_residual_video.py) before shipping it.
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"
WORK=${WORK:-/tmp/diffjax-device-runs}
CFG=experiments/configs/residual_video.py
case $MODE in
  gpu)   ARG=gpu; CACHE=$DEV/video_cache; LIMITS=(--stop_after_minutes=6.5); RESUME=() ;;
  smoke) ARG=smoke; CACHE=$WORK/video_cache; LIMITS=(--stop_after=2); RESUME=(--stop_after=4) ;;
  *) echo "usage: $0 [gpu|smoke]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
python3 -c "import jax; print('devices:', jax.devices())" | tee "$OUT/log.txt"
python3 -m experiments.train --config=$CFG:$ARG --workdir="$WORK/residual-video" \
  --config.data.cache_dir="$CACHE" "${LIMITS[@]}" --progress=false 2>&1 | tee -a "$OUT/log.txt"
if [ ${#RESUME[@]} -gt 0 ]; then  # smoke: resume from the step-2 checkpoint
  python3 -m experiments.train --config=$CFG:$ARG --workdir="$WORK/residual-video" \
    --config.data.cache_dir="$CACHE" "${RESUME[@]}" --progress=false 2>&1 | tee -a "$OUT/log.txt"
fi
python3 -m experiments.export --workdir "$WORK/residual-video" --out "$OUT/residual-video-$MODE" \
  --overwrite --note "device_run=experiments/device/residual_video.sh $MODE" 2>&1 \
  | tee -a "$OUT/log.txt"
cp "$WORK/residual-video/metrics.jsonl" "$OUT/residual_video_metrics.jsonl"
echo "done: $OUT/residual-video-$MODE"
