#!/usr/bin/env bash
# GPU verdict in one command: parity tests on the GPU, then the full benchmark, written to
# benchmarks/results/<device>-<date>/ (results.json, report.md, plots, pytest_summary.txt).
# Fits 10 minutes on one H100: the tests get at most TEST_TIMEOUT_S, the benchmark the rest
# (--budget-s; whatever it cannot start in time is listed as skipped in the report).
#
#   bash benchmarks/gpu_verdict.sh              # from the repo root, on a GPU machine
#   TOTAL_S=900 bash benchmarks/gpu_verdict.sh  # a longer budget
#   BENCH_ARGS="--quick" PYTEST_ARGS="-q" bash benchmarks/gpu_verdict.sh
#
# Works offline on the GPU image (torch 2.11, triton 3.6, python 3.12): the package is used
# from this checkout. st_adapter_fast.kernels lives in kernels/ (setup.py package_dir), so a
# bare PYTHONPATH does not find it: we `pip install -e . --no-deps --no-build-isolation` with
# the ahead-of-time CUDA build skipped (backend="cuda" JIT-builds csrc/ once, timed below), and
# fall back to a PYTHONPATH shim of symlinks when pip cannot install.
set -uo pipefail

START=$(date +%s)
TOTAL_S=${TOTAL_S:-570}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-300}
PYTHON=${PYTHON:-python3}
PYTEST_TARGET=${PYTEST_TARGET:-tests}  # relative to the repo root
PYTEST_ARGS=${PYTEST_ARGS:--x -q}
BENCH_ARGS=${BENCH_ARGS:-}
DEVICE=${VERDICT_DEVICE:-cuda}  # cpu only to dry-run this script on a machine without a GPU
cd "$(dirname "$0")/.."
REPO=$(pwd)
[ "$DEVICE" = cuda ] && unset TRITON_INTERPRET  # the GPU twins must run the compiled kernels
export PYTHONUNBUFFERED=1
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[verdict $(elapsed)s] $*"; }

# ------------------------------------------------------------------------- package import
if ! "$PYTHON" -c "import st_adapter_fast.kernels" 2>/dev/null; then
    log "installing the checkout (editable, no deps, AOT CUDA build skipped)"
    if ! ST_ADAPTER_FAST_SKIP_CUDA_BUILD=1 "$PYTHON" -m pip install -q -e . --no-deps --no-build-isolation \
            >/tmp/st_adapter_fast_pip.log 2>&1 \
       || ! "$PYTHON" -c "import st_adapter_fast.kernels" 2>/dev/null; then
        log "pip install failed (see /tmp/st_adapter_fast_pip.log); using a PYTHONPATH shim"
        SHIM=$(mktemp -d)/site
        mkdir -p "$SHIM/st_adapter_fast"
        for f in "$REPO"/st_adapter_fast/*; do ln -s "$f" "$SHIM/st_adapter_fast/$(basename "$f")"; done
        ln -sfn "$REPO/kernels" "$SHIM/st_adapter_fast/kernels"
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
        # `python -m` puts the working directory first on sys.path, where the checkout's
        # st_adapter_fast (no kernels/ inside) would shadow the shim: run from elsewhere.
        cd "$(dirname "$SHIM")"
    fi
fi
"$PYTHON" -c "import st_adapter_fast, st_adapter_fast.kernels, torch; print('st_adapter_fast', st_adapter_fast.__version__, 'from', st_adapter_fast.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())" \
    || { log "st_adapter_fast is not importable"; exit 1; }

OUT_DIR=$("$PYTHON" -c "from st_adapter_fast.bench.report import default_out_dir; print(default_out_dir('$DEVICE'))")
mkdir -p "$OUT_DIR"
log "results folder: $OUT_DIR"

# ------------------------------------------------------------- CUDA extension (JIT, once)
log "building the CUDA backend (JIT, cached under TORCH_EXTENSIONS_DIR)"
timeout 240 "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT_DIR/cuda_build.txt"
import time
t0 = time.perf_counter()
try:
    from st_adapter_fast.backends import cuda as cuda_backend
    ext = cuda_backend.load_extension()
    print(f"cuda backend: {'ready' if ext is not None else 'unavailable: ' + str(cuda_backend.extension_error())}"
          f" after {time.perf_counter() - t0:.1f} s")
except Exception as err:  # the benchmark reports the backend as skipped, with the reason
    print(f"cuda backend: unavailable ({type(err).__name__}: {err}) after {time.perf_counter() - t0:.1f} s")
EOF

# ---------------------------------------------------------------------- GPU parity tests
log "running the tests: python -m pytest $PYTEST_TARGET $PYTEST_ARGS (at most ${TEST_TIMEOUT_S}s)"
timeout -s INT "$TEST_TIMEOUT_S" "$PYTHON" -m pytest "$REPO/$PYTEST_TARGET" $PYTEST_ARGS -p no:cacheprovider -rfEs 2>&1 \
    | tee "$OUT_DIR/pytest_full.txt"
TEST_RC=${PIPESTATUS[0]}
{
    echo "python -m pytest $PYTEST_TARGET $PYTEST_ARGS -> exit code $TEST_RC$([ "$TEST_RC" = 124 ] && echo ' (timed out)')"
    grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest_full.txt" | head -50
    tail -n 1 "$OUT_DIR/pytest_full.txt"
} >"$OUT_DIR/pytest_summary.txt"
log "tests: exit code $TEST_RC"

# ---------------------------------------------------------------------------- benchmark
LEFT=$(( TOTAL_S - $(elapsed) ))
# keep ~90 s for the task in flight when the budget runs out (a max-autotune compile) and the report
BUDGET=$(( LEFT - 90 ))
if [ "$BUDGET" -lt 60 ]; then BUDGET=60; fi
log "benchmark with --budget-s $BUDGET"
timeout -s INT $(( LEFT > 120 ? LEFT : 120 )) "$PYTHON" -m st_adapter_fast bench --device "$DEVICE" \
    --out "$OUT_DIR" --budget-s "$BUDGET" --pytest-summary "$OUT_DIR/pytest_summary.txt" $BENCH_ARGS 2>&1 \
    | tee "$OUT_DIR/bench_log.txt"
BENCH_RC=${PIPESTATUS[0]}

log "done: tests exit $TEST_RC, bench exit $BENCH_RC; report $OUT_DIR/report.md"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
