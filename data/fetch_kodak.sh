#!/usr/bin/env bash
# Fetch the Kodak Lossless True Color Image Suite (24 PNGs, 768x512, ~15 MB) for the
# diffjax_kodak tfds builder (evaluation only; never train on it).
#   data/fetch_kodak.sh [DEST]      DEST defaults to ${DIFFJAX_DATA:-~/diffjax_data}/kodak
# Files land as DEST/kodim01.png .. kodim24.png, which is the builder's manual_dir layout.
set -euo pipefail
DEST="${1:-${DIFFJAX_DATA:-$HOME/diffjax_data}/kodak}"
BASE="https://r0k.us/graphics/kodak/kodak"
mkdir -p "$DEST"

source "$(dirname "${BASH_SOURCE[0]}")/download.sh"

# md5 of the copies the diffjax results were computed on (byte-identical to r0k.us).
MD5SUMS='
797a5ed9e768bac2143197febe74e9f0  kodim01.png
40bfc5a525f4659c132e72b7a733e45e  kodim02.png
5e9f48bd613eacfb6252c77ae7306a73  kodim03.png
f05d34fa98bd7fed4ecbe3597b71918e  kodim04.png
b79782844dae1e15aa9419c502a84f0a  kodim05.png
4be8c416ad84226df5ba3d289625770a  kodim06.png
4d97e7987524aff3bc495776179842be  kodim07.png
98454f0a6c3a35e70e69c20642c3bd1b  kodim08.png
07d3dba47087b5758a53010434cce622  kodim09.png
929943052e22f71b29bff2fbe197daff  kodim10.png
c04773608d99a39546de3d028a75bd35  kodim11.png
c6c8dea947e5431173a7347bdb2c2262  kodim12.png
9ddecfeef6f7915f5e5ce0d09f0c6c61  kodim13.png
a5b6b880ba060ad02805bbab60c399d0  kodim14.png
a858d33c424eaac1322cf3cab6d3d568  kodim15.png
a2308ff210e30c1969f7445135607f20  kodim16.png
52dac72df0b33bacc643ad6d42759964  kodim17.png
d1c85cf7358cd0bf4dd26c884f2e80b8  kodim18.png
d60e46f8c6fd8f8ae33a39e6eef22af3  kodim19.png
7d814638029aa1606caf78c7085414f4  kodim20.png
e7608675ced1dbc0b8d3a1878d8be675  kodim21.png
ceb46494f96589f8926a84bb5b66056e  kodim22.png
e1328ba2c55d5a72eb77e283c9630b90  kodim23.png
45a4912aaa0458940d5554ade1db5141  kodim24.png
'

fetched=0
for i in $(seq -w 1 24); do
  f="kodim$i.png"
  if [ -s "$DEST/$f" ]; then continue; fi
  echo "fetching $BASE/$f"
  download "$BASE/$f" "$DEST/$f"
  fetched=$((fetched + 1))
done

if command -v md5sum >/dev/null 2>&1; then
  if (cd "$DEST" && printf '%s\n' "$MD5SUMS" | sed '/^$/d' | md5sum -c --quiet -); then
    echo "checksums: all 24 files match"
  else
    echo "WARNING: some files differ from the reference checksums above" >&2
  fi
fi
echo "Kodak: fetched $fetched file(s); $(ls "$DEST"/kodim*.png | wc -l) images in $DEST"
echo "build: python -c \"from diffjax.input import tfds_builders as tb; tb.prepare('diffjax_kodak', manual_dir='$DEST')\""
