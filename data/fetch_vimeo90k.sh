#!/usr/bin/env bash
# Fetch the Vimeo-90k septuplet dataset (Xue et al., IJCV 2019; 82 GB zip, ~82 GB
# extracted: 91,701 clips of 7 448x256 PNG frames) for the diffjax_vimeo90k tfds builder.
#   data/fetch_vimeo90k.sh [DEST]   DEST defaults to ${DIFFJAX_DATA:-~/diffjax_data}/vimeo90k
# Layout written (the builder's manual_dir is DEST):
#   DEST/vimeo_septuplet/{sequences/XXXXX/YYYY/im1..7.png, sep_trainlist.txt, sep_testlist.txt}
# The download resumes when run again; pass KEEP_ZIP=1 to keep the zip after extraction.
set -euo pipefail
DEST="${1:-${DIFFJAX_DATA:-$HOME/diffjax_data}/vimeo90k}"
URL="http://data.csail.mit.edu/tofu/dataset/vimeo_septuplet.zip"
ZIP="$DEST/vimeo_septuplet.zip"
mkdir -p "$DEST"
source "$(dirname "${BASH_SOURCE[0]}")/download.sh"

if [ -f "$DEST/vimeo_septuplet/sep_trainlist.txt" ] && [ -d "$DEST/vimeo_septuplet/sequences" ]; then
  echo "Vimeo-90k already extracted in $DEST/vimeo_septuplet"
else
  free_gb=$(df -Pk "$DEST" | awk 'NR==2 {print int($4 / 1048576)}')
  echo "Vimeo-90k septuplets: 82 GB download + 82 GB extracted; $free_gb GB free in $DEST"
  if [ ! -s "$ZIP" ]; then
    echo "fetching $URL"
    download "$URL" "$ZIP" 5
  fi
  echo "extracting $ZIP"
  if command -v unzip >/dev/null 2>&1; then unzip -q -n "$ZIP" -d "$DEST"
  else python3 -m zipfile -e "$ZIP" "$DEST"; fi
  [ "${KEEP_ZIP:-0}" = 1 ] || rm -f "$ZIP"
fi
root="$DEST/vimeo_septuplet"
echo "Vimeo-90k in $root: $(grep -c . "$root/sep_trainlist.txt") train and" \
     "$(grep -c . "$root/sep_testlist.txt") test septuplets listed"
echo "build: python -c \"from diffjax.input import tfds_builders as tb; tb.prepare('diffjax_vimeo90k', manual_dir='$DEST')\""
