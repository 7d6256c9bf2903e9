#!/usr/bin/env bash
# The GPU check: every GPU figure ptserve reports, from one command, in one
# results folder. Run from the repository root on a machine with one CUDA GPU;
# it needs torch, transformers and safetensors (no web or store packages: every
# step runs through bench/without_server_deps.py) and no network.
#
#   bench/gpu_check.sh            # a GPU; 535 s of step limits at most on an H100/H200
#   bench/gpu_check.sh --smoke    # the same steps on the CPU with tiny shapes (CI runs this)
#
# Results: $OUT if it is set, else bench/results/DATE-GPUNAME/ (--smoke: a
# temporary folder). One log per step, then summary.md, which is also printed
# last: one line per target, the measured value, and whether it was met. It
# exits 1 if any step failed or ran out of time.
#
# Steps, in this order, each under its own time limit; a failing step does not
# stop the later ones:
#   a1  the oracle, continuous-batching and decode-step tests on the GPU,
#       float32, CUDA graphs on;
#   a2  the decode-step tests again with PTSERVE_COMPILE=true;
#   b   bench/engine.py, issue 4's workload: Llama 1.1B shape, bfloat16, 64
#       requests over 8 tasks, 20 pseudo + 64 input tokens, 128 new tokens,
#       modes (a)-(h) and (p);
#   c   bench/step_time.py: the decode step at 1, 8, 32 and 64 running rows,
#       with graphs and with graphs + torch.compile, and kernels per step;
#   d   bench/engine.py on the default model's shape (SmolLM2-135M, random
#       weights), (a) against (c).
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=false
case "${1:-}" in
    --smoke) smoke=true ;;
    "") ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
    *) echo "usage: bench/gpu_check.sh [--smoke]" >&2; exit 2 ;;
esac

py=${PYTHON:-python3}
if $smoke; then
    out=${OUT:-$(mktemp -d)}
    export PTSERVE_TEST_DEVICE=cpu
    big=tiny small=tiny rows="1 4" new=16 concurrency=8 serial=2 repeats=5
    tests_graphs=(tests/server/test_oracle.py::test_batched_greedy_equals_alone
                  tests/server/test_decode_step.py::test_padded_steps_equal_alone)
    tests_compile=("tests/server/test_decode_step.py::test_compiled_step_equals_alone[llama]")
    limits=(120 120 180 120 120)
else
    if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "no CUDA GPU visible to torch; bench/gpu_check.sh --smoke runs the steps on the CPU" >&2
        exit 2
    fi
    gpu=$("$py" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
    out=${OUT:-bench/results/$(date +%F)-$gpu}
    export PTSERVE_TEST_DEVICE=cuda
    big=llama-1b small=smollm2-135m rows="1 8 32 64" new=128 concurrency=64 serial=8 repeats=50
    # the compiled step's test runs in a2, not here: compilation is a2's time
    tests_graphs=(tests/server/test_oracle.py tests/server/test_slot_backend.py tests/server/test_decode_step.py
                  -k "not compiled_step")
    tests_compile=(tests/server/test_decode_step.py)
    limits=(45 90 250 100 50)  # seconds; the H200 run of 2026-11-28 took a1 31, a2 84, c 90, d 47, and b ran past 210 in (g)
fi
mkdir -p "$out"
echo "results: $out"
export PYTHONUNBUFFERED=1 PTSERVE_CUDA_GRAPHS=true
run="$py -m bench.without_server_deps"

# step NAME LIMIT_S COMMAND...: the command's output goes to the terminal and NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.log"
    if [ "$rc" -ne 0 ]; then failed+=("$name (exit $rc)"); fi
}
failed=()

{
    "$py" - <<'EOF'
import platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"host={platform.node()} gpu={gpu} torch={torch.__version__} cuda={torch.version.cuda} "
      f"transformers={transformers.__version__} python={platform.python_version()}")
EOF
    git log -1 --format='commit %H %s' 2>/dev/null || true
    if ! $smoke; then nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit --format=csv; fi
} 2>&1 | tee "$out/machine.log"

pytest_args=(-m pytest -p pytest_timeout -p no:cacheprovider -q)
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 # only the plugins named: none that imports the web stack
step a1-tests-graphs "${limits[0]}" $run "${pytest_args[@]}" "${tests_graphs[@]}"
PTSERVE_COMPILE=true step a2-tests-compile "${limits[1]}" $run "${pytest_args[@]}" "${tests_compile[@]}"
step b-engine-llama-1b "${limits[2]}" $run -m bench.engine --shape "$big" --dtype bfloat16 --tasks 8 \
    --prompt-len 20 --input-len 64 --new-tokens "$new" --concurrency "$concurrency" --serial "$serial" \
    --modes abcdefgh --compile --rate 100
# shellcheck disable=SC2086 # $rows is a list of numbers
step c-step-time "${limits[3]}" $run -m bench.step_time --shape "$big" --dtype bfloat16 --rows $rows \
    --prompt-len 20 --input-len 64 --new-tokens "$new" --repeats "$repeats"
step d-engine-smollm2-135m "${limits[4]}" $run -m bench.engine --shape "$small" --dtype bfloat16 --tasks 8 \
    --prompt-len 20 --input-len 64 --new-tokens "$new" --concurrency "$concurrency" --modes ac

echo
echo "== summary ($out/summary.md)"
if $smoke; then echo "(smoke: tiny shapes on the CPU check that every step runs; the targets are for a GPU run)"; fi
"$py" -m bench.gpu_summary "$out"
if [ ${#failed[@]} -gt 0 ]; then
    echo "steps that failed or ran out of time: ${failed[*]}"
    exit 1
fi
