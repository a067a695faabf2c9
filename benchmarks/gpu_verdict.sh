#!/usr/bin/env bash
# The GPU verdict in one command (docs/design.md §11): everything a short GPU window can tell,
# in priority order, as at most 8 files in --out DIR.
#
#   bash benchmarks/gpu_verdict.sh --out DIR                       # on the GPU machine, from anywhere
#   VERDICT_DEVICE=cpu bash benchmarks/gpu_verdict.sh --out DIR    # dry run: tiny shapes, interpreter
#
# It keeps to VERDICT_TOTAL_S (420 s) by its own clock, so a caller's 480 s limit never cuts it:
# it prints its plan first (one line per stage with its time limit, then `plan total: N s`),
# then runs the stages, each in its own process under `timeout`, each writing its rows into
# DIR/results.json as it goes:
#   setup     the package importable from this checkout (editable install, else a shim)
#   env       versions, GPU, clocks; starts the CUDA extension's JIT build in the background
#   smoke     triton and cuda, shape A bf16 fwd+bwd against the float64 reference: PASS/FAIL
#   headline  shape A fwd and fwd+bwd: eager (cuDNN on, off), triton, cuda; saved memory
#   parity    pytest -m gpu, in parallel (pytest-xdist), each test under pytest-timeout, no -x
#   sweep     every kernel's candidate tile configs on A, B, C -> DIR/tuned_configs.json
#   rest      shapes B, C; torch.compile default then max-autotune fwd on A; 12-adapter e2e step
#   report    DIR/report.md (headline first) and DIR/logs.tar.gz (every stage's full output)
# Time an earlier stage leaves unused goes to `rest`. A stage that runs out of time is killed
# and reported as cut short, with what it finished.
#
# Files in DIR: report.md, results.json, tuned_configs.json (when the sweep ran), logs.tar.gz.
# Works offline on the GPU image (python 3.12, torch 2.11, triton 3.6, no package index).
# Knobs (for tests and reruns): VERDICT_TOTAL_S, VERDICT_LIMIT_<STAGE>=S, VERDICT_ONLY=env,smoke,
# VERDICT_PARITY_WORKERS, VERDICT_TEST_TIMEOUT_S, VERDICT_INJECT=<stage>=raise|hang, PYTHON.
set -uo pipefail

START=$(date +%s)
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=${2:-}; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "gpu_verdict.sh: unknown argument $1 (usage: gpu_verdict.sh --out DIR)" >&2; exit 2 ;;
    esac
done
[ -n "$OUT" ] || { echo "gpu_verdict.sh: --out DIR is required" >&2; exit 2; }

DEVICE=${VERDICT_DEVICE:-cuda}
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_verdict.sh: VERDICT_DEVICE must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
TOTAL_S=${VERDICT_TOTAL_S:-420}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/report.md" "$OUT/results.json" "$OUT/tuned_configs.json" "$OUT/logs.tar.gz"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/st-adapter-verdict.XXXXXX")
export PYTHONUNBUFFERED=1 VERDICT_DEVICE="$DEVICE"
if [ "$DEVICE" = cuda ]; then unset TRITON_INTERPRET; else export TRITON_INTERPRET=1; fi

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[verdict $(elapsed)s] $*"; }

# ------------------------------------------------------------------------------------ plan
STAGES=(setup env smoke headline parity sweep rest report)
declare -A LIMIT=([setup]=25 [env]=20 [smoke]=45 [headline]=50 [parity]=80 [sweep]=100 [rest]=85 [report]=15)
declare -A WHAT=(
    [setup]="package importable from this checkout (editable install or shim)"
    [env]="versions, GPU, clocks; CUDA extension JIT build starts in the background"
    [smoke]="triton, cuda: shape A bf16 fwd+bwd vs the float64 reference, PASS/FAIL"
    [headline]="shape A fwd, fwd+bwd: eager (cuDNN on/off), triton, cuda; saved memory"
    [parity]="pytest -m gpu, parallel (xdist), per-test timeout, no -x"
    [sweep]="candidate tile configs per kernel on A, B, C -> tuned_configs.json"
    [rest]="shapes B, C; torch.compile default, max-autotune fwd on A; 12-adapter e2e (+ time left over)"
    [report]="report.md, results.json, logs.tar.gz"
)
for s in "${STAGES[@]}"; do
    var="VERDICT_LIMIT_${s^^}"
    [ -n "${!var:-}" ] && LIMIT[$s]=${!var}
done
ONLY=",${VERDICT_ONLY:-},"
selected() { [ "$ONLY" = ",," ] || [ "$1" = setup ] || [ "$1" = report ] || [[ "$ONLY" == *",$1,"* ]]; }

PLAN_TOTAL=0
echo "verdict plan: device $DEVICE, at most $TOTAL_S s by this script's clock, results in $OUT"
: >"$WORK/plan.tsv"
for s in "${STAGES[@]}"; do
    selected "$s" || continue
    printf '  %-9s %4d s  %s\n' "$s" "${LIMIT[$s]}" "${WHAT[$s]}"
    printf '%s\t%s\t%s\n' "$s" "${LIMIT[$s]}" "${WHAT[$s]}" >>"$WORK/plan.tsv"
    PLAN_TOTAL=$(( PLAN_TOTAL + LIMIT[$s] ))
done
echo "plan total: $PLAN_TOTAL s"
if [ "$PLAN_TOTAL" -gt "$TOTAL_S" ]; then
    echo "gpu_verdict.sh: the plan ($PLAN_TOTAL s) exceeds the budget ($TOTAL_S s)" >&2
    exit 2
fi
cp "$WORK/plan.tsv" "$WORK/plan.txt"
: >"$WORK/stages.tsv"

pack_logs() { tar czf "$OUT/logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv -f "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }

# run_stage NAME CMD...: under `timeout`, at most its limit and never past the report's reserve;
# `rest` gets all the time left. Its output goes to the console and to WORK/NAME.log.
run_stage() {
    local name=$1; shift
    if ! selected "$name"; then return 0; fi
    local now left limit rc t0
    now=$(elapsed)
    left=$(( TOTAL_S - LIMIT[report] - now ))
    limit=${LIMIT[$name]}
    if [ "$name" = rest ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 5 ]; then
        log "stage $name: not run, ${left}s left of the budget"
        printf '%s\t%s\t0\tskip\tnot run (budget used up)\n' "$name" "${LIMIT[$name]}" >>"$WORK/stages.tsv"
        return 0
    fi
    log "stage $name (limit ${limit}s)"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" --stage-limit "$limit" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$(( $(date +%s) - t0 ))" "$rc" >>"$WORK/stages.tsv"
    [ "$rc" = 0 ] || log "stage $name: exit code $rc$( [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (time limit: cut short)')"
    pack_logs
}

VERDICT=("$PYTHON" -m st_adapter_fast.bench.verdict)
VARGS=(--out "$OUT" --work "$WORK" --repo "$REPO" --device "$DEVICE")

# ------------------------------------------------------------------------- setup (shell)
# st_adapter_fast.kernels lives in kernels/ (setup.py package_dir), so a bare PYTHONPATH does not
# find it: pip install -e . --no-deps --no-build-isolation (the AOT CUDA build skipped; cuda
# JIT-builds in the env stage), else a PYTHONPATH shim of symlinks.
IMPORT_CHECK="import st_adapter_fast, st_adapter_fast.kernels, torch; print('st_adapter_fast', st_adapter_fast.__version__, 'from', st_adapter_fast.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
setup_package() {
    if "$PYTHON" -c "$IMPORT_CHECK" 2>/dev/null; then
        return 0
    else
        echo "installing the checkout (editable, no deps, AOT CUDA build skipped)"
        if ! ST_ADAPTER_FAST_SKIP_CUDA_BUILD=1 timeout $(( LIMIT[setup] - 8 )) "$PYTHON" -m pip install -q -e "$REPO" \
                --no-deps --no-build-isolation --no-index \
           || ! "$PYTHON" -c "import st_adapter_fast.kernels" 2>/dev/null; then
            echo "pip install failed; using a PYTHONPATH shim"
            SHIM=$WORK/shim
            mkdir -p "$SHIM/st_adapter_fast"
            for f in "$REPO"/st_adapter_fast/*; do ln -sfn "$f" "$SHIM/st_adapter_fast/$(basename "$f")"; done
            ln -sfn "$REPO/kernels" "$SHIM/st_adapter_fast/kernels"
            export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
            # `python -m` puts the working directory first on sys.path, where the checkout's
            # st_adapter_fast (no kernels/ inside) would shadow the shim: run from elsewhere.
            cd "$WORK" || return 1
        fi
    fi
    "$PYTHON" -c "$IMPORT_CHECK"
}
log "stage setup (limit ${LIMIT[setup]}s)"
T0=$(date +%s)
setup_package >"$WORK/setup.log" 2>&1
SETUP_RC=$?
cat "$WORK/setup.log"
printf '%s\t%s\t%s\t%s\n' setup "${LIMIT[setup]}" "$(( $(date +%s) - T0 ))" "$SETUP_RC" >>"$WORK/stages.tsv"
if [ "$SETUP_RC" != 0 ]; then
    log "st_adapter_fast is not importable: nothing else can run"
    { echo "# GPU verdict: setup failed"; echo; echo "st_adapter_fast could not be imported from $REPO; setup.log:";
      echo; echo '```'; tail -n 40 "$WORK/setup.log"; echo '```'; } >"$OUT/report.md"
    pack_logs; rm -rf "$WORK"; exit 1
fi

if [ "$DEVICE" = cuda ] && ! grep -q "| cuda True" "$WORK/setup.log"; then
    # nothing can be measured: keep the window's time, report what env sees (nvidia-smi, versions)
    log "torch sees no CUDA device: running env and the report only"
    echo "This is a GPU run but torch.cuda.is_available() is False: only env ran." >"$WORK/no_cuda.txt"
    ONLY=",env,"
    NO_CUDA=1
fi

# ------------------------------------------------------------------------------ stages
BUILD_PID=""
if selected env || selected smoke || selected headline || selected parity || selected rest; then
    # the CUDA JIT build (minutes of nvcc) overlaps env, smoke and headline; they wait for it
    # only as long as their own limits allow
    timeout -k 5 $(( TOTAL_S - LIMIT[report] - $(elapsed) )) "${VERDICT[@]}" cuda-build "${VARGS[@]}" \
        >"$WORK/cuda_build.log" 2>&1 &
    BUILD_PID=$!
fi
run_stage env "${VERDICT[@]}" env "${VARGS[@]}"
run_stage smoke "${VERDICT[@]}" smoke "${VARGS[@]}"
run_stage headline "${VERDICT[@]}" headline "${VARGS[@]}"
run_stage parity "${VERDICT[@]}" parity "${VARGS[@]}"
run_stage sweep "${VERDICT[@]}" sweep "${VARGS[@]}"
run_stage rest "${VERDICT[@]}" rest "${VARGS[@]}"
if [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2>/dev/null; then
    log "the CUDA build is still running: stopping it"
    kill "$BUILD_PID" 2>/dev/null; wait "$BUILD_PID" 2>/dev/null
fi

# ------------------------------------------------------------------------------ report
log "stage report"
T0=$(date +%s)
timeout -k 5 "${LIMIT[report]}" "${VERDICT[@]}" report "${VARGS[@]}" >"$WORK/report.log" 2>&1
REPORT_RC=$?
printf '%s\t%s\t%s\t%s\n' report "${LIMIT[report]}" "$(( $(date +%s) - T0 ))" "$REPORT_RC" >>"$WORK/stages.tsv"
if [ "$REPORT_RC" != 0 ]; then
    { echo; echo "## The report stage failed (exit code $REPORT_RC)"; echo;
      echo "This file is the last partial report a stage wrote. Stage table (name, limit s, took s, exit code):";
      echo; echo '```'; cat "$WORK/stages.tsv"; echo; tail -n 30 "$WORK/report.log"; echo '```'; } >>"$OUT/report.md"
fi
pack_logs
# exit code 0 only when every stage that ran finished cleanly
FAILED_STAGES=$(awk -F'\t' '$4 != "0" && $4 != "skip" {printf "%s ", $1}' "$WORK/stages.tsv")
rm -rf "$WORK"

FILES=$(find "$OUT" -type f | wc -l)
log "done in $(elapsed)s: $FILES files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
# the headline section, for a caller that sees only the end of the output
awk '/^## Headline/{f=1} f && /^## Stages/{exit} f' "$OUT/report.md" 2>/dev/null
if [ -n "${NO_CUDA:-}" ]; then log "no CUDA device: nothing measured"; exit 1; fi
if [ -n "$FAILED_STAGES" ]; then log "stages not clean: $FAILED_STAGES(see report.md)"; exit 1; fi
exit 0
