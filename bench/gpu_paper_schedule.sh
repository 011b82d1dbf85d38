#!/usr/bin/env bash
# Issue 12 on one GPU, in one go (at most 570 s: the three time limits below); installs nothing.
#
#   bash bench/gpu_paper_schedule.sh            # SD 1.5-shaped random weights, on the GPU
#   bash bench/gpu_paper_schedule.sh --tiny     # the same steps with the tiny model on the CPU (a check of the script)
#
# Writes under $OUT (default out/gpu_paper_schedule): default.json (the SD 1.5 config's schedule, projected
# from 0.17 of its steps = 204 + 255, and the plain-loop comparison in the same process), low_vram.json
# (configs/low_vram.toml's schedule), levers.json (phase-2 ms/step with each speed lever off and on), a .log
# per run, and summary.md (the tables). Each run has its own time limit and rewrites its JSON after each
# part, so one that fails or overruns leaves what it measured and the other runs' results.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-out/gpu_paper_schedule}
WORK=${WORK:-${TMPDIR:-/tmp}/paper_schedule}
TINY=()
SCALE=0.17        # x (1200, 1500) = 204 + 255 steps: >= 200 per phase for the projection
BENCH=(--bench-steps 8 --bench-warmup 3)
LIMIT_DEFAULT=280 # seconds: model build, photos, the schedule, the plain loop (570 s in all, under one 600 s call)
LIMIT_LOWVRAM=170
LIMIT_LEVERS=120
if [ "${1:-}" = "--tiny" ]; then
  TINY=(--tiny)
  SCALE=0.004     # 5 + 6 steps: the CPU check of the script, not a measurement
  BENCH=(--bench-steps 1 --bench-warmup 1)
  LIMIT_DEFAULT=600
  LIMIT_LOWVRAM=300
  LIMIT_LEVERS=600
fi
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run() {  # name, time limit, then paper_schedule.py's arguments
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$PY" bench/paper_schedule.py "${TINY[@]}" --work "$WORK" --json "$OUT/$name.json" \
    "${BENCH[@]}" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ "$rc" = 0 ]; then echo "   done"; else
    echo "   exit $rc (124: stopped at the time limit); $OUT/$name.json holds the parts that finished" | tee -a "$OUT/summary.md"; fi
  # the tables paper_schedule.py prints last
  awk '/^(\| stage|plain loop|\| lever)/{p=1} p' "$OUT/$name.log" | tee -a "$OUT/summary.md"
  return 0
}

: > "$OUT/summary.md"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$OUT/summary.md"
echo "## default: configs/magicapture_sd15.toml" >> "$OUT/summary.md"
run default "$LIMIT_DEFAULT" --steps-scale "$SCALE" --plain
echo "## low_vram: configs/low_vram.toml" >> "$OUT/summary.md"
run low_vram "$LIMIT_LOWVRAM" --config configs/low_vram.toml --steps-scale "$SCALE"
echo "## levers: phase-2 steps of the SD 1.5 shapes, each lever off / on" >> "$OUT/summary.md"
run levers "$LIMIT_LEVERS" --skip-schedule --levers
echo "results: $OUT (default.json, low_vram.json, levers.json, summary.md)"
