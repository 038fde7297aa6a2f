#!/usr/bin/env bash
# Fetch CLIC 2020 (Challenge on Learned Image Compression) professional + mobile images
# for the diffjax_clic tfds builder (~7 GB of zips, ~8 GB extracted).
#   data/fetch_clic.sh [DEST] [professional|mobile|all]   (default: all)
# DEST defaults to ${DIFFJAX_DATA:-~/diffjax_data}/clic. Layout written (the builder's
# manual_dir): DEST/{professional,mobile}/{train,valid,test}/*.png
set -euo pipefail
DEST="${1:-${DIFFJAX_DATA:-$HOME/diffjax_data}/clic}"
TRACKS="${2:-all}"
BASE="https://data.vision.ee.ethz.ch/cvl/clic"
[ "$TRACKS" = all ] && TRACKS="professional mobile"
mkdir -p "$DEST/zips"
source "$(dirname "${BASH_SOURCE[0]}")/download.sh"

fetch() {  # fetch URL FILE: download unless FILE is already there
  if [ -s "$2" ]; then echo "have $2"; return; fi
  echo "fetching $1"
  download "$1" "$2"
}

extract_pngs() {  # extract_pngs ZIP OUTDIR: every PNG of the zip, flattened into OUTDIR
  local tmp; tmp="$(mktemp -d "$DEST/.extract.XXXXXX")"
  if command -v unzip >/dev/null 2>&1; then unzip -q "$1" -d "$tmp"
  else python3 -m zipfile -e "$1" "$tmp"; fi
  mkdir -p "$2"
  find "$tmp" -type f -iname '*.png' -exec mv -t "$2" {} +
  rm -rf "$tmp"
  echo "  $(find "$2" -maxdepth 1 -iname '*.png' | wc -l) PNGs in $2"
}

for track in $TRACKS; do
  case "$track" in
    professional) test_zip="test/CLIC2020Professional_test.zip" ;;
    mobile) test_zip="test/CLIC2020Mobile_test.zip" ;;
    *) echo "unknown track $track (professional, mobile or all)" >&2; exit 2 ;;
  esac
  for split in train valid test; do
    if [ "$split" = test ]; then url="$BASE/$test_zip"; else url="$BASE/${track}_${split}_2020.zip"; fi
    zip="$DEST/zips/${track}_${split}.zip"
    if ! fetch "$url" "$zip"; then
      echo "WARNING: could not fetch $url; $track/$split skipped" >&2
      continue
    fi
    extract_pngs "$zip" "$DEST/$track/$split"
  done
done
echo "CLIC 2020 ($TRACKS) in $DEST; the zips stay in $DEST/zips (delete them to save space)"
echo "build: python -c \"from diffjax.input import tfds_builders as tb; tb.prepare('diffjax_clic/professional', manual_dir='$DEST')\""
