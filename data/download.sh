# Sourced by the data/fetch_*.sh scripts (not run on its own).
# download URL FILE [RETRIES]: resumable download (curl, else wget) into FILE.part, renamed
# to FILE only when complete, so an interrupted run never leaves a file that looks done.
download() {
  local url="$1" out="$2" retries="${3:-3}"
  if command -v curl >/dev/null 2>&1; then
    curl -fL --retry "$retries" -C - -o "$out.part" "$url" || return 1
  else
    wget -c -O "$out.part" "$url" || return 1
  fi
  mv "$out.part" "$out"
}
