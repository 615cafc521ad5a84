#!/usr/bin/env bash
# The GPU checks in one run: device info, the kernel-compile and CUDA-contract tests (and on a GPU the products'
# GPU tests), bench/ffn.py and bench/train_step.py, each stage under a timeout and the next run whatever it gave;
# a pass/fail summary at the end (exit 1 if a stage failed). The timeouts sum to 560 s, for one 10-minute GPU
# session on an H100/H200; without a GPU the benches run short settings, so the script itself is checked on a CPU.
#
#     bench/gpu_check.sh OUTDIR        (PYTHON: the interpreter, default python)
set -u
[ $# -eq 1 ] || { echo "usage: bench/gpu_check.sh OUTDIR" >&2; exit 2; }
out=$(realpath -m "$1")
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true HF_HUB_OFFLINE=1
summary=()

stage() {  # stage NAME SECONDS COMMAND...: run it under a timeout, its output to OUTDIR/NAME.log and the terminal
    local name=$1 limit=$2 rc
    shift 2
    echo "=== $name (timeout ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) summary+=("PASS     $name") ;;
        124|137) summary+=("TIMEOUT  $name (${limit}s)") ;;
        *) summary+=("FAIL     $name (exit $rc)") ;;
    esac
}

if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    tests=(tests/test_kernels_compile.py tests/test_cuda_contracts.py tests/test_product.py)
    ffn=(--shapes tinyllama-1.1b llama2-7b llama2-13b --tokens 8192 16384)
    train=(--steps 5)
else
    tests=(tests/test_kernels_compile.py tests/test_cuda_contracts.py)
    ffn=(--shapes tiny --tokens 64 --repeats 1)
    train=(--steps 2 --methods dense sparse_pretrain)
fi
stage info 30 "$py" -c "
import torch, triton
print('torch', torch.__version__, '· CUDA', torch.version.cuda, '· Triton', triton.__version__,
      '· available', torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), '· capability', torch.cuda.get_device_capability(),
          '· cuSPARSELt', torch.backends.cusparselt.is_available(), torch.backends.cusparselt.version())"
stage tests 150 "$py" -m pytest "${tests[@]}" -q -p no:cacheprovider
stage ffn 180 "$py" bench/ffn.py "${ffn[@]}" --out "$out/ffn.md"
stage train_step 200 "$py" bench/train_step.py "${train[@]}" --out "$out/train_step.md"

echo "=== summary (logs and tables in $out)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
! grep -qv '^PASS' "$out/summary.txt"
