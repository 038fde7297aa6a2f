#!/usr/bin/env bash
# Train the diffusion-autoencoder codecs (Rampas 2024, issue 27) on a lent GPU in under 9
# minutes and return them through $OUT: the image codec (`diffae.py:gpu`: EfficientNetV2-S,
# TAEF2 first stage, 256 px crops of BSDS500 train + val, batch 32) for 5 minutes, then the
# video codec (`diffae_video.py:gpu` at f_t = 8: 8-frame groups of the training clips,
# 128 px crops, batch 8) for 2.5 minutes; each stopped by wall time with an Orbax
# checkpoint, then exported as a model folder.
#
#   experiments/device/prepare.sh            # once, here: fills the ignored .device/ folder
#   run tool: command "experiments/device/diffae.sh",
#             carry [".device/whl", ".device/data/bsds500_trainval", ".device/data/taesd",
#                    ".device/diffae_frames"], timeout 600     (about 40 MB)
#   experiments/device/diffae.sh smoke       # here, on the CPU: the smoke configs, 2 steps each
#   experiments/device/diffae.sh image       # the image codec only (the whole budget)
#
# $OUT/diffae-gpu and $OUT/diffae-video-gpu are model folders (model.json + params.msgpack):
#   diffjax compress photo.png --codec diffae --model $OUT/diffae-gpu -o photo.djx
#   diffjax compress clip.mp4 --codec diffae-video --model $OUT/diffae-video-gpu -o clip.djx
# $OUT/*_metrics.jsonl are the training logs; the workdirs stay on the device.
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"
WORK=${WORK:-/tmp/diffjax-device-runs/diffae}
case $MODE in
  gpu|image)
         use_carried_data  # common.sh: the shared data layout over .device/data
         CFG=gpu; VCFG=gpu,ft8
         if [ "$MODE" = image ]; then LIMITS=(--stop_after_minutes=7.5); else
           LIMITS=(--stop_after_minutes=5); fi
         VLIMITS=(--stop_after_minutes=2.5)
         VDATA=(--config.data.path="$PWD/$DEV/diffae_frames" --config.data.video_kind=frames) ;;
  smoke) CFG=smoke; VCFG=smoke,ft2; LIMITS=(--stop_after=2); VLIMITS=(--stop_after=2); VDATA=() ;;
  *) echo "usage: $0 [gpu|image|smoke]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
python3 -c "import jax; print('devices:', jax.devices())" | tee "$OUT/log.txt"
python3 -m experiments.train --config=experiments/configs/diffae.py:$CFG \
  --workdir="$WORK/image" --config.keep_checkpoints=1 "${LIMITS[@]}" --progress=false \
  2>&1 | tee -a "$OUT/log.txt"
python3 -m experiments.export --workdir "$WORK/image" --out "$OUT/diffae-gpu" --overwrite \
  --note "device_run=experiments/device/diffae.sh $MODE" 2>&1 | tee -a "$OUT/log.txt"
cp "$WORK/image/metrics.jsonl" "$OUT/image_metrics.jsonl"
if [ "$MODE" != image ]; then
  python3 -m experiments.train --config=experiments/configs/diffae_video.py:$VCFG \
    --workdir="$WORK/video" --config.keep_checkpoints=1 "${VDATA[@]}" "${VLIMITS[@]}" --progress=false \
    2>&1 | tee -a "$OUT/log.txt"
  python3 -m experiments.export --workdir "$WORK/video" --out "$OUT/diffae-video-gpu" \
    --overwrite --note "device_run=experiments/device/diffae.sh $MODE" 2>&1 | tee -a "$OUT/log.txt"
  cp "$WORK/video/metrics.jsonl" "$OUT/video_metrics.jsonl"
fi
echo "done: $OUT"
