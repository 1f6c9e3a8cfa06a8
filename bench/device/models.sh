#!/usr/bin/env bash
# The tracked model weights (~80 MB) cannot travel in one device call beside a GGUF part (64 MiB a call), so each
# call takes only the folders it needs (bench/device/README.md):
#   bash bench/device/models.sh out               every tracked *.safetensors moved to .gpu/models/ (git-ignored)
#   bash bench/device/models.sh in refrag-k16 ... those model folders' files moved back into the tree
#   bash bench/device/models.sh in                all of them back (run it when the device calls are done)
#   bash bench/device/models.sh status            which model folders have their weights in the tree
set -euo pipefail
cd "$(dirname "$0")/../.."
cmd=${1:-status}; shift || true
files=$(git ls-files '*.safetensors')
wanted() {  # is the file's model folder one of the names given (or were none given)?
  [ $# -le 1 ] && return 0
  local f=$1; shift
  for name in "$@"; do [ "$(basename "$(dirname "$f")")" = "$name" ] && return 0; done
  return 1
}
case $cmd in
  out) for f in $files; do
         [ -f "$f" ] || continue
         mkdir -p ".gpu/models/$(dirname "$f")" && mv "$f" ".gpu/models/$f"
       done ;;
  in) for f in $files; do
        wanted "$f" "$@" || continue
        if [ -f ".gpu/models/$f" ]; then mv ".gpu/models/$f" "$f"; fi
      done
      [ -d .gpu/models ] && find .gpu/models -type d -empty -delete ;;
  status) ;;
  *) echo "usage: $0 out | in [model folder names] | status" >&2; exit 2 ;;
esac
for f in $files; do if [ -f "$f" ]; then basename "$(dirname "$f")"; fi; done | sort -u | tr '\n' ' '
echo "<- model folders with weights in the tree"
