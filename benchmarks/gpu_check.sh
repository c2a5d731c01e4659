#!/usr/bin/env bash
# Every GPU figure in one command, for when a GPU machine is lent (one H100/H200; <= 8 minutes; no downloads):
#   1. Versatile Diffusion img2img at real size (random weights, 512 px, fp16 UNet): images/s batched vs
#      batch 1 and vs the reference per-image loop, and the max image difference between batch sizes
#      (benchmarks/versatile_bench.py --real-size);
#   2. ridge at the real NSD subject-1 shape on the GPU, float64 decomposition, against four measured
#      scikit-learn fits on the machine's CPUs and the extrapolated reference
#      (benchmarks/ridge_bench.py --shape nsd --device cuda; writes 12.3 GB to $TMP_DIR, deletes it);
#   3. the real-size rehearsal of every model in fp16 on the GPU (python -m models.rehearse).
# Each part runs under its own time limit inside a total budget; a part that fails or runs out of time
# is reported and the next one still runs.  The last block, SUMMARY, repeats the figures.
#
#   benchmarks/gpu_check.sh                # on the GPU machine, from anywhere
#   benchmarks/gpu_check.sh --dry-run      # check the environment, print the commands, run nothing
#   benchmarks/gpu_check.sh --smoke        # tiny sizes on the CPU: checks the plumbing without a GPU
#   benchmarks/gpu_check.sh --only ridge,versatile
#   benchmarks/gpu_check.sh --wheels .whl  # first install the wheels in .whl/ (packages a bare GPU image lacks,
#                                          # e.g. diffusers, open_clip_torch, ftfy, wcwidth) into /tmp/gpu_check_site
#
# Environment: PY (python; default .venv/bin/python when present, else python3), OUT or GPU_CHECK_OUT
# (folder for the logs and summary.txt; default gpu_check_output/), TMP_DIR (ridge data; default /tmp),
# BUDGET (total seconds, default 480), T_VERSATILE / T_RIDGE / T_REHEARSE (per-part limits, default
# 100 / 200 / 180 seconds).
set -u
cd "$(dirname "$0")/.." || exit 2

MODE=gpu
ONLY="versatile,ridge,rehearse"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry ;;
        --smoke) MODE=smoke ;;
        --only) shift; ONLY="${1:-}" ;;
        --only=*) ONLY="${1#--only=}" ;;
        --wheels) shift; WHEELS="${1:-}" ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
for part in ${ONLY//,/ }; do
    case "$part" in versatile|ridge|rehearse) ;;
        *) echo "gpu_check.sh: --only: unknown part '$part' (versatile, ridge, rehearse)" >&2; exit 2 ;;
    esac
done

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -n "${WHEELS:-}" ]; then
    ls "$WHEELS"/*.whl > /dev/null 2>&1 || { echo "gpu_check.sh: --wheels: no .whl files in '$WHEELS'" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site "$WHEELS"/*.whl || { echo "gpu_check.sh: installing the wheels failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT_DIR="${GPU_CHECK_OUT:-${OUT:-gpu_check_output}}"
TMP_DIR="${TMP_DIR:-/tmp}"
BUDGET="${BUDGET:-480}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR" || exit 2
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
START=$(date +%s)

say() { echo "$*" | tee -a "$SUMMARY"; }

if [ "$MODE" = smoke ]; then
    DEVICE=cpu
    VERSATILE=("$PY" benchmarks/versatile_bench.py --device cpu --images 2 --batch-size 2 --steps 4 --repeats 1)
    RIDGE=("$PY" benchmarks/ridge_bench.py --shape nsd --tiny --device cpu --tmp-dir "$TMP_DIR")
    REHEARSE=("$PY" -m models.rehearse --help)  # the real-size CPU rehearsal is `make rehearse`, not a smoke test
else
    DEVICE=cuda
    VERSATILE=("$PY" benchmarks/versatile_bench.py --real-size --device cuda --images 8 --batch-size 8 --repeats 2)
    RIDGE=("$PY" benchmarks/ridge_bench.py --shape nsd --device cuda --dtype float64 --tmp-dir "$TMP_DIR")
    REHEARSE=("$PY" -m models.rehearse --device cuda --dtype fp16)
fi

# ------------------------------------------------------------------ environment
say "== gpu_check ($MODE) $(date -u '+%F %T') UTC on $(hostname), logs in $OUT_DIR, budget ${BUDGET}s"
if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1 \
        | sed 's/^/  GPU: /' | tee -a "$SUMMARY"
fi
ENV_REPORT=$("$PY" - "$DEVICE" <<'EOF' 2>&1
import importlib, os, sys
device = sys.argv[1]
need = {"versatile": ["torch", "numpy", "diffusers", "transformers"],
        "ridge": ["torch", "numpy", "sklearn", "threadpoolctl", "tqdm"],
        "rehearse": ["torch", "numpy", "diffusers", "transformers", "open_clip", "safetensors", "models.rehearse"]}
missing = {}
for part, mods in need.items():
    for m in mods:
        try:
            importlib.import_module(m)
        except Exception as exc:  # ImportError, or a broken install
            missing.setdefault(part, []).append(f"{m} ({type(exc).__name__})")
import torch
line = f"python {sys.version.split()[0]} at {sys.executable}; torch {torch.__version__}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    line += f"; CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB"
print(line)
print(f"CPUs {os.cpu_count()}")
if device == "cuda" and not torch.cuda.is_available():
    print("NOCUDA")
for part, ms in missing.items():
    print(f"MISSING {part}: {', '.join(ms)}")
EOF
) || { say "  cannot run $PY: $ENV_REPORT"; exit 2; }
echo "$ENV_REPORT" | grep -v -e '^NOCUDA' -e '^MISSING' | sed 's/^/  /' | tee -a "$SUMMARY"
if echo "$ENV_REPORT" | grep -q '^NOCUDA'; then
    say "  torch sees no CUDA GPU: run this on the GPU machine, or use --smoke (CPU, tiny sizes) / --dry-run"
    [ "$MODE" = dry ] || exit 2
fi
missing_for() { echo "$ENV_REPORT" | sed -n "s/^MISSING $1: //p"; }
FREE_GB=$(df -Pk "$TMP_DIR" 2>/dev/null | awk 'NR==2 {printf "%d", $4 / 1048576}')

# ------------------------------------------------------------------ parts
declare -A RC SECS
run_part() {  # name, default limit, command...
    local name=$1 limit=$2
    shift 2
    local log="$OUT_DIR/$name.log" left miss
    if [[ ",$ONLY," != *",$name,"* ]]; then RC[$name]="not selected"; return; fi
    miss=$(missing_for "$name")
    if [ -n "$miss" ]; then
        if [[ "$miss" == *models.rehearse* ]]; then
            hint="models/rehearse.py is not in this checkout (issue 17's rehearsal branch)"
        else
            hint="install them, or carry them as wheels to a bare GPU machine"
        fi
        say "-- $name: SKIPPED, missing Python modules: $miss; $hint"
        RC[$name]="skipped (missing $miss)"; return
    fi
    if [ "$name" = ridge ] && [ "$MODE" = gpu ] && [ "${FREE_GB:-0}" -lt 14 ]; then
        say "-- ridge: SKIPPED, $TMP_DIR has ${FREE_GB:-?} GB free; the NSD-shape data need 12.3 GB (set TMP_DIR)"
        RC[$name]="skipped (disk)"; return
    fi
    left=$(( BUDGET - ($(date +%s) - START) ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$MODE" = dry ]; then
        say "-- $name: would run (limit ${limit}s): $*"
        RC[$name]="dry run"; return
    fi
    if [ "$limit" -lt 20 ]; then
        say "-- $name: SKIPPED, only ${left}s of the ${BUDGET}s budget left"
        RC[$name]="skipped (budget)"; return
    fi
    say "-- $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout -k 15 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    SECS[$name]=$(( $(date +%s) - t0 ))
    case $rc in
        0) RC[$name]="ok" ;;
        124|137) RC[$name]="TIMED OUT after ${limit}s (partial output in $log)" ;;
        *) RC[$name]="FAILED rc=$rc (see $log)" ;;
    esac
    tail -n 40 "$log"
    echo
}

run_part versatile "${T_VERSATILE:-100}" "${VERSATILE[@]}"
run_part ridge "${T_RIDGE:-200}" "${RIDGE[@]}"
run_part rehearse "${T_REHEARSE:-180}" "${REHEARSE[@]}"

# ------------------------------------------------------------------ summary
say ""
say "== SUMMARY ($MODE, $(( $(date +%s) - START ))s in all)"
for name in versatile ridge rehearse; do
    say "  $name: ${RC[$name]:-?}${SECS[$name]:+ in ${SECS[$name]}s}"
done
if [ "$MODE" != dry ]; then
    for f in versatile ridge; do
        [ -f "$OUT_DIR/$f.log" ] || continue
        grep -h -e '^real-size random VD' -e '^BATCH SIZES' -e '^SPEEDUP' -e '^NSD SHAPE' -e '^  ours:' \
            -e 'peak CUDA' -e 'max|ours - sklearn|' "$OUT_DIR/$f.log" | sed "s/^ */  $f: /" | tee -a "$SUMMARY"
    done
    if [ -f "$OUT_DIR/rehearse.log" ]; then
        say "  rehearse: last lines of its table (full log in $OUT_DIR/rehearse.log):"
        tail -n 25 "$OUT_DIR/rehearse.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
fi
for name in versatile ridge rehearse; do
    case "${RC[$name]:-}" in ok|"not selected"|"dry run") ;; *) exit 1 ;; esac
done
exit 0
