#!/usr/bin/env bash
# The device check for the day a GPU is lent (at most 11 minutes of steps on an H200), in one command:
#   bash bench/gpu_check.sh OUT_DIR
# 1. the fused Triton kernels compiled for and run on the GPU against the dense reference, values and
#    every gradient (tests/test_triton_core.py and the Triton cases of tests/test_pallas_path.py with
#    MTA_PALLAS_INTERPRET=0);
# 2. bench/attention.py for the kq_conv layer (6x11 pre-softmax conv), D=128, bf16: every path with
#    jax.nn.dot_product_attention (cuDNN) from T=1024 to 4096;
# 3. the paper's full layer (6x11 before and after the softmax, 16-head mixing on both sides, group norm,
#    gate) and mixing over all 16 heads alone, T=1024 to 4096: what "auto" runs for them on a GPU (the
#    blockwise path: the Triton kernels have no post conv and mix at most 4 heads) against the reference;
#    the pallas rows record why they are not run;
# 4. the memory-linear paths of kq_conv on to T=32768.
# Everything lands in OUT_DIR (logs, JUnit XML, attention-<gpu>.json and .png); commit it under
# bench/results/ with the device named. Each step has its own time limit, so one hang loses one step.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MTA_PALLAS_INTERPRET=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
python=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$python" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())" 2>&1
  git rev-parse HEAD 2>/dev/null
} > "$out/environment.txt"
cat "$out/environment.txt"

echo "== 1/4 kernel tests on the GPU (values and gradients against the reference)"
timeout 200 "$python" -m pytest -q -p no:cacheprovider tests/test_triton_core.py \
  "tests/test_pallas_path.py::test_triton_kernel_packed_gqa" \
  "tests/test_pallas_path.py::test_triton_kernel_kv_longer_left_padding" \
  "tests/test_pallas_path.py::test_through_multi_token_attention" \
  --junitxml "$out/kernel-tests.xml" 2>&1 | tee "$out/kernel-tests.log"

echo "== 2/4 bench/attention.py kq_conv, every path, T=1024..4096"
timeout 170 "$python" bench/attention.py --configs kq_conv --head-dims 128 --min-len 1024 --max-len 4096 \
  --iters 5 --warmup 2 --point-seconds 4 --out "$out" 2>&1 | tee "$out/attention.log"

echo "== 3/4 bench/attention.py full and mix_all, every path, T=1024..4096"
timeout 150 "$python" bench/attention.py --configs full mix_all --head-dims 128 --min-len 1024 --max-len 4096 \
  --iters 3 --warmup 1 --point-seconds 3 --append --out "$out" 2>&1 | tee -a "$out/attention.log"

echo "== 4/4 bench/attention.py kq_conv, the memory-linear paths, T=8192..32768"
timeout 170 "$python" bench/attention.py --configs kq_conv --head-dims 128 --min-len 8192 --max-len 32768 \
  --paths blockwise pallas dot_product_attention --iters 3 --warmup 1 --point-seconds 4 --append \
  --out "$out" 2>&1 | tee -a "$out/attention.log"
echo "== done: $out"
ls -l "$out"
