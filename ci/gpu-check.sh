#!/usr/bin/env bash
# The GPU check: the one prepared script for a machine with an Nvidia GPU (written for the H200
# some sessions are lent: a driver, perhaps no CUDA toolkit, no network, perhaps no Rust).
#
#   bash ci/gpu-check.sh              # on the GPU machine, from the repository root
#   bash ci/gpu-check.sh --prepare    # beforehand, on a machine with cargo: builds the binaries
#                                     # the check runs into target/gpu-check-bin/, for a GPU
#                                     # machine without cargo (carry that folder there)
#
# Steps, each with a time limit, the whole under 8 minutes; a failed step is reported and the
# next one still runs:
#   libs     NVRTC and cuBLAS loadable under a name cudarc tries: a CUDA 13 library (say, from the
#            image's Python packages) is linked as libX.so; without any NVRTC the pinned wheel is
#            installed as CI does (ci/nvrtc.sh; from $DSV4_WHEEL_DIR, or .whl/, where offline)
#   build    cargo build of the CLI and the test binaries (skipped with prebuilt binaries)
#   devices  dsv4 devices
#   unit     cargo test -p dsv4-backend-cuda: unit tests, the NVRTC compile test (with
#            DSV4_REQUIRE_NVRTC=1) and tests/driver_gpu.rs (the device itself, DSV4_CUDA_DEVICE=0)
#            (prebuilt: one step each, unit / nvrtc / driver)
#   ops      the op-level suite's GPU half (backend_ops_cuda gpu::), DSV4_CUDA_DEVICE=0
#   fixtures every fixture's prefill and decode on the GPU (cuda_conformance on_a_gpu)
#   nccl     the communicator suite on real NCCL (cuda_nccl gpu::), one rank per GPU the machine
#            has (DSV4_CUDA_DEVICES): worlds of one rank on a one-GPU machine
# (the emulator halves of those two test files ran in CI and are skipped here)
#   check    dsv4 check --backends cpu,cuda on the built-in model
#   serve    dsv4 serve --backend cuda on the built-in model: the OpenAI and Anthropic APIs answer
#            (ci/serve_smoke.py), and Ctrl-C ends it
#   bench    only where asked for and time is left: dsv4 bench --backend cuda on the synthetic
#            0.75 B checkpoint (../shared/bench/gen_synthetic.py mini, run there with the machine's
#            torch: DSV4_GPU_BENCH_GEN=path/to/gen_synthetic.py; or an existing DSV4_GPU_BENCH_MODEL
#            directory), then the same profiled. With --prepare the generator is copied into the
#            carried folder when ../shared/bench has it, and the run finds it there.
# Output: gpu-check-summary.txt (one line a step, then 'N passed, N failed') and gpu-check.log
# (everything) in $OUT when set, else target/gpu-check/. Exits non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
BIN="$ROOT/target/gpu-check-bin"
# The binaries a prebuilt run needs.
EXPECTED="dsv4 backend_cuda_unit nvrtc_compile driver_gpu backend_ops_cuda cuda_conformance cuda_nccl"

if [ "${1:-}" = "--prepare" ]; then
    rm -rf "$BIN"
    mkdir -p "$BIN"
    executables() {
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])'
    }
    # The CLI in release: the bench step times it (host-side launch overhead counts at decode).
    for build in "cargo build --release -p dsv4-cli" "cargo test -p dsv4-backend-cuda --no-run" \
        "cargo test -p dsv4-tests --test backend_ops_cuda --no-run" \
        "cargo test -p dsv4-tests --test cuda_conformance --test cuda_nccl --no-run"; do
        if ! $build --message-format=json | executables >"$BIN/.list"; then
            echo "error: '$build' failed; nothing to carry" >&2
            exit 1
        fi
        while read -r name exe; do
            case "$name" in dsv4_backend_cuda) name=backend_cuda_unit ;; esac
            # No debug info: the carried folder must stay small (a few tens of MiB).
            strip --strip-debug -o "$BIN/$name" "$exe"
        done <"$BIN/.list"
    done
    rm -f "$BIN/.list"
    for b in $EXPECTED; do
        [ -x "$BIN/$b" ] || { echo "error: $BIN/$b was not built" >&2; exit 1; }
    done
    # Tests find their fixtures through the source path compiled into them.
    echo "$ROOT" >"$BIN/built-in"
    if [ -f "$ROOT/../shared/bench/gen_synthetic.py" ]; then
        cp "$ROOT/../shared/bench/gen_synthetic.py" "$BIN/"
    fi
    ls -la "$BIN"
    du -sh "$BIN"
    exit 0
fi

DEADLINE=$(($(date +%s) + 470))
DEST=${OUT:-$ROOT/target/gpu-check}
mkdir -p "$DEST"
SUMMARY="$DEST/gpu-check-summary.txt"
LOG="$DEST/gpu-check.log"
: >"$SUMMARY"
: >"$LOG"
PASSED=0
FAILED=0

note() {
    echo "$*" | tee -a "$SUMMARY" >>"$LOG"
}

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with at most LIMIT seconds (less when the
# overall deadline is nearer), output to the log; one summary line with the tests' counts, the
# output lines matching $SHOW (when set), and for a failure its first error lines. With
# OPTIONAL set, a step there is no time left for is skipped without counting as a failure.
step() {
    local name=$1 limit=$2
    shift 2
    local shown
    shown=$(echo "$*" | tr -s ' \n' ' ')
    local left=$((DEADLINE - $(date +%s) - 5))
    if [ "$left" -lt 10 ]; then
        note "$(printf '%-11s %-8s %s' SKIPPED "$name" "no time left under the 8-minute limit: $shown")"
        [ -n "${OPTIONAL:-}" ] || FAILED=$((FAILED + 1))
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local out="$DEST/.step-$name"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$out" 2>&1
    rc=$?
    { echo "===== $name (limit ${limit}s, rc $rc): $shown"; cat "$out"; } >>"$LOG"
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAILED($rc)" ;;
    esac
    if [ "$rc" -eq 0 ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
    note "$(printf '%-11s %-8s %4ss  %s' "$status" "$name" $(($(date +%s) - t0)) "$shown")"
    grep -E "^test result:${SHOW:+|$SHOW}" "$out" | sed 's/^/                  /' >>"$SUMMARY"
    if [ "$rc" -ne 0 ]; then
        { grep -E '^error(\[|:)|panicked at|^test .* FAILED$|^failures:$' -A1 "$out" | head -12 ||
            tail -3 "$out"; } | sed 's/^/                  | /' >>"$SUMMARY"
    fi
    rm -f "$out"
}

# ----------------------------------------------------------------------------- libraries
# shellcheck source=ci/nvrtc.sh
source ci/nvrtc.sh
export DSV4_LIB_LINKS="$ROOT/target/gpu-check/lib-links"
libs() {
    local dirs=() d
    while IFS= read -r d; do dirs+=("$d"); done < <(
        {
            # The toolkit first: it matches the driver, while a Python package's NVRTC may be
            # newer than the driver and emit PTX it rejects.
            ls -d /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 2>/dev/null
            python3 -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null |
                while IFS= read -r sp; do find "$sp/nvidia" -maxdepth 2 -type d -name lib 2>/dev/null; done
        } | awk '!seen[$0]++'
    )
    echo "folders searched: ${dirs[*]:-none}"
    local ok=0
    if dsv4_link_library nvrtc "${dirs[@]}"; then
        echo "NVRTC: $DSV4_FOUND"
    elif DSV4_WHEEL_DIR=${DSV4_WHEEL_DIR:-$([ -d .whl ] && echo "$ROOT/.whl")} dsv4_nvrtc_setup target/nvrtc-venv; then
        echo "NVRTC: $DSV4_NVRTC_LIB (wheel)"
    else
        echo "NVRTC: not found, and the wheel could not be installed"
        ok=1
    fi
    if dsv4_link_library cublas "${dirs[@]}"; then
        echo "cuBLAS: $DSV4_FOUND"
    else
        echo "cuBLAS: not found (pip install nvidia-cublas-cu12, or carry its wheel)"
        ok=1
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    return $ok
}
# Run in this shell (not through `step`'s subprocess) so LD_LIBRARY_PATH carries on.
echo "===== libs" >>"$LOG"
t0=$(date +%s)
if libs >>"$LOG" 2>&1; then status=ok; PASSED=$((PASSED + 1)); else status=FAILED; FAILED=$((FAILED + 1)); fi
note "$(printf '%-11s %-8s %4ss  %s' "$status" libs $(($(date +%s) - t0)) "$(grep -E '^(NVRTC|cuBLAS):' "$LOG" | paste -sd ';' -)")"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"

# ----------------------------------------------------------------------------- build and run
export DSV4_REQUIRE_NVRTC=1 DSV4_CUDA_DEVICE=0 RUST_BACKTRACE=1 CARGO_TERM_COLOR=never
# Every GPU this process sees, for the NCCL suite (one rank per GPU): as many ordinals as
# CUDA_VISIBLE_DEVICES lists where it is set, else as nvidia-smi counts.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    DSV4_CUDA_DEVICES=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | awk 'NF { printf "%s%d", (n++ ? "," : ""), n - 1 }')
else
    DSV4_CUDA_DEVICES=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | awk 'NF { printf "%s%d", (n++ ? "," : ""), n - 1 }')
fi
export DSV4_CUDA_DEVICES=${DSV4_CUDA_DEVICES:-0}
if command -v cargo >/dev/null; then
    note "mode        cargo $(cargo --version 2>/dev/null | cut -d' ' -f2)"
    step build 300 bash -c 'cargo build --release -p dsv4-cli && cargo test -p dsv4-backend-cuda --no-run &&
        cargo test -p dsv4-tests --test backend_ops_cuda --test cuda_conformance --test cuda_nccl --no-run'
    DSV4="$ROOT/target/release/dsv4"
    SHOW='^cuda ' step devices 30 "$DSV4" devices
    step unit 90 cargo test -p dsv4-backend-cuda
    # The GPU halves only: the emulator halves ran in CI and would spend device time here.
    step ops 60 cargo test -p dsv4-tests --test backend_ops_cuda -- gpu::
    SHOW='max rel err' step fixtures 150 cargo test -p dsv4-tests --test cuda_conformance -- on_a_gpu --nocapture
    step nccl 120 cargo test -p dsv4-tests --test cuda_nccl -- gpu:: --test-threads=1
elif [ -d "$BIN" ]; then
    # Prebuilt (ci/gpu-check.sh --prepare): the tests find their fixtures under the path they
    # were built in, so that path must lead here.
    built=$(cat "$BIN/built-in" 2>/dev/null || echo "$ROOT")
    if [ "$built" != "$ROOT" ] && [ ! -e "$built" ]; then
        mkdir -p "$(dirname "$built")" && ln -s "$ROOT" "$built"
    fi
    note "mode        prebuilt binaries from $BIN (built in $built)"
    for b in $EXPECTED; do
        [ -x "$BIN/$b" ] || note "missing     $b: rerun 'bash ci/gpu-check.sh --prepare' and carry target/gpu-check-bin"
    done
    DSV4="$BIN/dsv4"
    SHOW='^cuda ' step devices 30 "$DSV4" devices
    # One step per binary, so that a failure in one does not hide the others.
    step unit 30 bash -c "cd '$built/backend-cuda' && '$BIN/backend_cuda_unit'"
    step nvrtc 60 bash -c "cd '$built/backend-cuda' && '$BIN/nvrtc_compile'"
    step driver 60 bash -c "cd '$built/backend-cuda' && '$BIN/driver_gpu'"
    step ops 60 bash -c "cd '$built/tests' && '$BIN/backend_ops_cuda' gpu::"
    SHOW='max rel err' step fixtures 150 bash -c "cd '$built/tests' && '$BIN/cuda_conformance' on_a_gpu --nocapture"
    step nccl 120 bash -c "cd '$built/tests' && '$BIN/cuda_nccl' gpu:: --test-threads=1"
else
    note "FAILED      build    no cargo here and no prebuilt binaries: run 'bash ci/gpu-check.sh --prepare' where cargo is, and carry target/gpu-check-bin"
    FAILED=$((FAILED + 1))
    DSV4=""
fi
if [ -n "$DSV4" ]; then
    SHOW='^ok:' step check 90 "$DSV4" check --model builtin:tiny --backends cpu,cuda
    # The server on the GPU, as a user runs it; Ctrl-C must end it cleanly (exit 0).
    # shellcheck disable=SC2016 # expanded by the inner shell
    SHOW='^(chat|stream|anthropic|ok):' step serve 120 bash -c '
        "$0" serve --backend cuda --model builtin:tiny --port 18199 &
        pid=$!
        python3 ci/serve_smoke.py 18199
        rc=$?
        kill -INT "$pid"
        wait "$pid" || { echo "serve exited with $? after Ctrl-C"; rc=1; }
        exit $rc' "$DSV4"
fi

# ----------------------------------------------------------------------------- bench (optional)
GEN=${DSV4_GPU_BENCH_GEN:-}
[ -z "$GEN" ] && [ -f "$BIN/gen_synthetic.py" ] && [ -n "${DSV4_GPU_BENCH:-}" ] && GEN="$BIN/gen_synthetic.py"
BENCH_MODEL=${DSV4_GPU_BENCH_MODEL:-}
if [ -n "$DSV4" ] && [ -z "$BENCH_MODEL" ] && [ -n "$GEN" ]; then
    BENCH_MODEL=/tmp/dsv4-gpu-bench/v4mini
    [ -f "$BENCH_MODEL/config.json" ] ||
        OPTIONAL=1 step gen 150 python3 "$GEN" "$BENCH_MODEL" mini
fi
if [ -n "$DSV4" ] && [ -n "$BENCH_MODEL" ] && [ -f "$BENCH_MODEL/config.json" ]; then
    OPTIONAL=1 SHOW='^ +[0-9]+ +[0-9.]|^weights|^kv cache|^model' step bench 150 "$DSV4" bench --backend cuda \
        --model "$BENCH_MODEL" --contexts 512,4096 --decode-steps 32
    OPTIONAL=1 SHOW='^ +[0-9]+ +[0-9.]|^(prefill|decode) ' step profile 120 "$DSV4" bench --backend cuda \
        --model "$BENCH_MODEL" --contexts 512 --decode-steps 8 --profile
fi

note "$PASSED passed, $FAILED failed"
echo "summary: $SUMMARY; log: $LOG"
cat "$SUMMARY"
[ "$FAILED" -eq 0 ]
