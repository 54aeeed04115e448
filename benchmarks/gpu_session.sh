#!/usr/bin/env bash
# One device call for issue 8: build the CUDA extension, run the CUDA tests, compute-sanitizer, and the GPU
# benchmark; every log and the benchmark JSON go to $OUT (what the device tool brings back).
#
#   bash benchmarks/gpu_session.sh [PHASE ...]      # default: facts build test bench sanitize
#
# Phases:
#   facts     nvidia-smi, torch/CUDA versions, nvcc, compute-sanitizer (a few seconds)
#   build     python3 setup.py build_ext --inplace for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a), resource report
#   test      tests/test_ops_cuda.py (every kernel vs the reference, gradcheck, graph capture)
#   sanitize  tools/cuda_sanitize.py under compute-sanitizer memcheck and racecheck
#   bench     benchmarks/run_gpu.py --sizes paper core (BENCH_SIZES overrides), JSON into $OUT
#
# One device command may run 10 minutes, so the whole script keeps to TOTAL_LIMIT seconds (default 560):
# each phase gets the smaller of its own limit and what is left, and a phase with under 20 s left is
# skipped (and says so). The benchmark comes before the sanitizer: its JSON is the issue's deliverable,
# and the kernels' memory checking also runs on the CPU (emulated, under AddressSanitizer).
#
# Peers: wheels in .whl/ (`python tools/gpu_wheels.py` fetches them, ~3 MiB; name .whl in the call's carry)
# are installed into /tmp/site first, as the device README says; the bench phase fails if a peer is still
# missing (--require-peers) rather than skip it. Each phase has its own time limit (PHASE_LIMIT_<name>
# seconds) so that one stuck phase cannot eat the whole call; the summary lines come last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/concept_ext-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(facts build test bench sanitize)
TOTAL_LIMIT=${TOTAL_LIMIT:-560}
SUMMARY=()

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "gpu_session: wheel install failed"
fi
# after the wheels: an import-time stand-in for wandb, which sae-lens imports but the benchmark never calls
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}:$PWD/benchmarks/gpu_stubs

# run_phase NAME DEFAULT_LIMIT_S: runs phase_NAME in a child bash under a time limit (timeout cannot run a
# shell function itself), logs to $OUT/NAME.log, records its exit code
run_phase() {
    local name=$1 limit=$2
    local var="PHASE_LIMIT_${name}"; limit=${!var:-$limit}
    local left=$((TOTAL_LIMIT - SECONDS - 5))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("$name: skipped, ${left} s left of TOTAL_LIMIT=${TOTAL_LIMIT}")
        return 124
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    echo "== $name (limit ${limit}s) $(date -u +%T)"
    timeout "$limit" bash -c "phase_$name" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$name: rc $rc in $((SECONDS - t0)) s")
    return "$rc"
}

phase_facts() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    nvcc --version | tail -2
    command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
}

phase_build() {
    rm -f concept_ext/_C*.so concept_ext/.built
    "$PY" setup.py -q build_ext --inplace || return 1
    "$PY" -m concept_ext info
    local so; so=$(ls concept_ext/_C*.so | head -1)
    # registers / shared memory / spills per kernel (the device README: read what costs no device time)
    cuobjdump --dump-resource-usage "$so" > "$OUT/resource-usage.txt" 2>&1 || true
    grep -c "Function" "$OUT/resource-usage.txt" || true
}

phase_test() {
    "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py tests/test_cuda_sanitize_driver.py \
        tests/test_train_graph.py
}

phase_sanitize() {
    local rc=0
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
        "$PY" tools/cuda_sanitize.py > "$OUT/memcheck.log" 2>&1 || rc=$?
    tail -5 "$OUT/memcheck.log"; echo "memcheck rc $rc"
    local rc2=0
    compute-sanitizer --tool racecheck --error-exitcode 3 "$PY" tools/cuda_sanitize.py --small \
        > "$OUT/racecheck.log" 2>&1 || rc2=$?
    tail -5 "$OUT/racecheck.log"; echo "racecheck rc $rc2"
    return $((rc | rc2))
}

phase_bench() {
    local date gpu; date=$(date -u +%F)
    # the card actually lent (an H100 or an H200), e.g. "nvidia-h100-80gb-hbm3"
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
    # shellcheck disable=SC2086
    "$PY" benchmarks/run_gpu.py --require-peers --sizes ${BENCH_SIZES:-paper core} --out "$OUT/${gpu:-gpu}-$date.json"
}

export -f phase_facts phase_build phase_test phase_sanitize phase_bench
export OUT PY

status=0
for p in "${PHASES[@]}"; do
    case $p in
        facts) run_phase facts 60 phase_facts || status=1 ;;
        build) run_phase build 300 phase_build || { status=1; echo "build failed: the other phases need it"; break; } ;;
        test) run_phase test 180 phase_test || status=1 ;;
        bench) run_phase bench 300 phase_bench || status=1 ;;
        sanitize) run_phase sanitize 240 phase_sanitize || status=1 ;;
        *) echo "gpu_session: unknown phase $p (facts build test sanitize bench)"; status=2 ;;
    esac
done
cp -f concept_ext/_build_info.json "$OUT/" 2>/dev/null || true
echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
exit $status
