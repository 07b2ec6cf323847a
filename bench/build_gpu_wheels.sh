#!/usr/bin/env bash
# Build, on a machine with network, what bench/gpu.sh installs on the GPU image,
# which has Python 3.12, torch + triton + transformers + peft, and no network:
# memgen's own wheel (with its compiled C++ runtime) for cp312 and the pure test
# dependencies the image may lack. Output: .gpu-wheels/ (git-ignored, ~25 MB);
# carry it to the GPU machine beside the checkout (device tool: carry [".gpu-wheels"]).
# Usage: bash bench/build_gpu_wheels.sh        (PY312=/path/to/python3.12 to pick one)
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
OUT=.gpu-wheels
$PY312 -c "import sys; assert sys.version_info[:2] == (3, 12), sys.version" \
  || { echo "build_gpu_wheels.sh: need Python 3.12 (the GPU image's); set PY312" >&2; exit 1; }
VENV=$(mktemp -d)/venv
$PY312 -m venv "$VENV"
rm -rf "$OUT" && mkdir -p "$OUT"
"$VENV/bin/pip" wheel -q --no-deps -w "$OUT" .
"$VENV/bin/pip" download -q -d "$OUT" --only-binary=:all: pytest pytest-benchmark hypothesis gguf
rm -rf "$(dirname "$VENV")"
ls "$OUT"
du -sh "$OUT"
