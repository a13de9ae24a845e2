#!/usr/bin/env bash
# Every GPU case of `dmae-certify bench` in one go: about 5 minutes on one H100/H200-class GPU.
#
#   bench/gpu.sh [OUTDIR]     (default OUTDIR: bench-results/gpu; on the device machine use $OUT)
#
# Writes OUTDIR/<case>.json and .log, then prints a Markdown table for docs/PERFORMANCE.md.
# Cases, all on random weights (throughput does not depend on the weights' values):
#   vit-b16           ViT-B/16 at 224, engine in bf16 autocast, n=100,000; reference loop timed
#                     on 10,000 samples; 16 jobs x n=1,000; service path with n=10,000
#   vit-b16-compiled  the same engine with torch.compile (static, padded batches); reference
#                     timed on 2,000 samples
#   vit-l16           ViT-L/16 at 224, n=100,000; reference timed on 4,000 samples
# A case that fails (e.g. no Triton for torch.compile) is reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench-results}/gpu}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"

bench() {  # bench NAME TIMEOUT_S ARGS...
  local name=$1 limit=$2
  shift 2
  echo "== $name: dmae-certify bench --device ${DEVICE:-cuda} $*"
  timeout "$limit" "$py" -c 'import sys; from app.cli import main; sys.exit(main())' \
    bench --device "${DEVICE:-cuda}" "$@" --json "$out/$name.json" >"$out/$name.log" 2>&1
  local status=$?
  ((status == 0)) || echo "!! $name failed (exit $status); last lines of $out/$name.log:"
  tail -n 12 "$out/$name.log"
}

# Time limits keep the whole script under 10 minutes even if every case hangs.
bench vit-b16 180 --model vit-b16 --n 100000 --service-n 10000
bench vit-b16-compiled 240 --model vit-b16 --n 100000 --compile --reference-n 2000 --service off
bench vit-l16 150 --model vit-l16 --n 100000 --reference-n 4000 --service off

shopt -s nullglob
results=("$out"/*.json)
if ((${#results[@]})); then
  "$py" -m bench.summary "${results[@]}" | tee "$out/summary.md"
fi
