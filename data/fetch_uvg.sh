#!/usr/bin/env bash
# Fetch the UVG 1080p test sequences (Mercat et al., MMSys 2020) as raw 8-bit YUV 4:2:0
# for the diffjax_uvg tfds builder: Beauty, Bosphorus, HoneyBee, Jockey, ReadySteadyGo,
# ShakeNDry, YachtRide (1920x1080, 120 fps, 600 frames each, ShakeNDry 300; ~2 GB of
# 7z archives, ~12 GB of .yuv).
#   data/fetch_uvg.sh [DEST] [SEQUENCE ...]   DEST defaults to ${DIFFJAX_DATA:-~/diffjax_data}/uvg
# Layout written (the builder's manual_dir is DEST): DEST/NAME_1920x1080_120fps_420_8bit_YUV.yuv
# Extraction needs 7z/7za/7zz (Debian: apt-get install 7zip) or `pip install py7zr`.
set -euo pipefail
DEST="${1:-${DIFFJAX_DATA:-$HOME/diffjax_data}/uvg}"
shift || true
SEQUENCES=("$@")
[ ${#SEQUENCES[@]} -gt 0 ] || SEQUENCES=(Beauty Bosphorus HoneyBee Jockey ReadySteadyGo ShakeNDry YachtRide)
BASE="https://ultravideo.fi/video"
mkdir -p "$DEST/archives"
source "$(dirname "${BASH_SOURCE[0]}")/download.sh"

extract() {  # extract ARCHIVE OUTDIR
  local z
  for z in 7z 7za 7zz; do
    if command -v "$z" >/dev/null 2>&1; then "$z" x -y -o"$2" "$1" >/dev/null; return; fi
  done
  if python3 -c "import py7zr" 2>/dev/null; then python3 -m py7zr x "$1" "$2"; return; fi
  echo "no 7z extractor: apt-get install 7zip (or p7zip-full), or pip install py7zr" >&2
  exit 1
}

for name in "${SEQUENCES[@]}"; do
  stem="${name}_1920x1080_120fps_420_8bit_YUV"
  if [ -s "$DEST/$stem.yuv" ]; then echo "have $DEST/$stem.yuv"; continue; fi
  archive="$DEST/archives/${stem}_RAW.7z"
  if [ ! -s "$archive" ]; then
    echo "fetching $BASE/${stem}_RAW.7z"
    download "$BASE/${stem}_RAW.7z" "$archive"
  fi
  tmp="$(mktemp -d "$DEST/.extract.XXXXXX")"
  extract "$archive" "$tmp"
  yuv="$(find "$tmp" -type f -iname '*.yuv' | head -n 1)"
  if [ -z "$yuv" ]; then echo "no .yuv inside $archive" >&2; exit 1; fi
  mv "$yuv" "$DEST/$stem.yuv"  # the name carries the geometry the builder reads
  rm -rf "$tmp"
  frames=$(( $(stat -c %s "$DEST/$stem.yuv") / (1920 * 1080 * 3 / 2) ))
  echo "  $DEST/$stem.yuv: $frames frames"
done
echo "UVG: ${#SEQUENCES[@]} sequence(s) in $DEST; archives kept in $DEST/archives (delete to save space)"
echo "build: python -c \"from diffjax.input import tfds_builders as tb; tb.prepare('diffjax_uvg/clips16', manual_dir='$DEST')\""
