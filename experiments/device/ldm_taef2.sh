#!/usr/bin/env bash
# Train ldm_taef2 (diffjax's own latent diffusion model in the TAEF2 space, issue 25) on a
# lent GPU: `ldm_taef2.py:gpu` (256 px crops, batch 32, the wider UNet), training stopped
# after 7 minutes of wall time with an Orbax checkpoint, then the EMA UNet exported with its
# model card. The latent cache (BSDS500 train + val and the training clips, encoded once by
# the frozen TAEF2 encoder) is built first, outside the training's time budget.
#
#   experiments/device/prepare.sh            # once, here: fills the ignored .device/ folder
#   run tool: command "experiments/device/ldm_taef2.sh",
#             carry [".device/whl", ".device/data"], timeout 600
#   experiments/device/ldm_taef2.sh smoke    # here, on the CPU: the tiny config
#
# $OUT/work is the training workdir (checkpoint + metrics.jsonl: resume it with the same
# --config on any machine), $OUT/ldm_taef2-gpu the exported model folder
# (diffjax.convert.load_pretrained); evaluate it here with
#   python -m experiments.eval_ldm $OUT/ldm_taef2-gpu --out results/ldm_taef2
set -euo pipefail
source "$(dirname "$0")/common.sh" "$@"
case $MODE in
  gpu)   CFG=gpu; LIMITS=(--stop_after_minutes=7)
         use_carried_data  # common.sh: the shared data layout over .device/data
         CACHE=/tmp/ldm_taef2_latents ;;
  smoke) CFG=smoke; LIMITS=(--stop_after=2); CACHE=${WORK:-/tmp/diffjax-device-runs}/latents_smoke ;;
  *) echo "usage: $0 [gpu|smoke]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
python3 -c "import jax; print('devices:', jax.devices())" | tee "$OUT/log.txt"
python3 - "$CFG" "$CACHE" <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import sys, time
from diffjax.input import latent_cache
from experiments.configs import ldm_taef2
t0 = time.perf_counter()
spec = latent_cache.CacheSpec.from_config(ldm_taef2.get_config(sys.argv[1]).data.latent_cache.to_dict())
latent_cache.ensure_cache(spec, sys.argv[2], progress=False)
print(f"latent cache {sys.argv[2]}: {time.perf_counter() - t0:.1f} s")
PY
python3 -m experiments.train --config=experiments/configs/ldm_taef2.py:$CFG \
  --workdir="$OUT/work" --config.data.path="$CACHE" --config.keep_checkpoints=1 \
  "${LIMITS[@]}" --progress=false 2>&1 | tee -a "$OUT/log.txt"
python3 -m experiments.export_ldm "$OUT/work" "$OUT/ldm_taef2-gpu" --overwrite \
  --hardware "one NVIDIA GPU (experiments/device/ldm_taef2.sh $MODE)" 2>&1 | tee -a "$OUT/log.txt"
echo "done: $OUT/ldm_taef2-gpu"
