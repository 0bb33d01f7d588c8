#!/usr/bin/env bash
# The prepared GPU check, for ONE call of the device tool (H100 or H200, about 8 minutes):
#   1. fastnce-bench gpu: every GPU backend on float16 / bfloat16 / float32 against the float64
#      reference, the bf16 matmul rate, then simclr-16k, clip-32k, clip-128k and clip-1m for
#      fastnce-triton, fastnce-cuda, eager, torch.compile and inf-cl;
#   2. the `gpu`-marked tests, in what time is left;
#   3. if time is still left, siglip-32k (fastnce-triton, eager, torch.compile) into $OUT/siglip.
# From the repository root, with the Inf-CL wheel copied into carry/ (an ignored folder):
#   mkdir -p carry && cp ../shared/anchors/inf_cl-1.2.1-py3-none-any.whl carry/
#   optional, saves the ~1 min JIT build of csrc/ there: bash benchmarks/build_device_ext.sh
#   device run: bash benchmarks/gpu_session.sh    carry: ["carry"]    timeout_s: 560
# Results land in $OUT (the device tool brings them back) and benchmarks/results/.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
start=$(date +%s)
# A fastnce._C built here for the device's Python and torch (benchmarks/build_device_ext.sh) is
# used if it was built from this csrc/ and loads with this torch; else the cuda backend compiles
# csrc/ on first use (a stale build would time old kernels).
csrc_sha=$(bash benchmarks/csrc_sha.sh)
for so in carry/_C.cpython-*.so; do
  [ -f "$so" ] || continue
  if [ "$(cat carry/_C.csrc-sha256 2>/dev/null)" != "$csrc_sha" ]; then
    echo "carried $so was built from other csrc/ sources: JIT build"; continue
  fi
  cp "$so" fastnce/
  if python -c "import torch, fastnce._C" 2>/tmp/ext-load.log; then echo "using the carried $so"
  else echo "carried $so does not load ($(tail -1 /tmp/ext-load.log)): JIT build"; rm -f fastnce/_C.cpython-*.so; fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-card.txt"
timeout 450 python -m fastnce.bench gpu --out "$out" 2>&1 | tee "$out/gpu-bench.log"
left=$((530 - ($(date +%s) - start)))
if [ "$left" -gt 30 ]; then
  # the issues' must-show tests first (NCCL at world size 1, offsets past 2**31), then the rest;
  # no -x: a failure must not hide the tests after it
  timeout "$left" python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_distributed.py::test_nccl_world_size_one tests/test_edges.py tests/test_cuda.py \
    tests/test_triton.py tests/test_siglip.py 2>&1 | tee "$out/gpu-tests.log"
fi
left=$((545 - ($(date +%s) - start)))
if [ "$left" -gt 90 ]; then
  # best effort, last: SigLIP's triton kernels against eager and torch.compile (no issue's must-show)
  timeout "$left" python -m fastnce.bench gpu --skip-check --gemm-size 4096 --cases siglip-32k \
    --impls fastnce-triton,eager,torch.compile --out "$out/siglip" 2>&1 | tee "$out/gpu-siglip.log"
fi
cp -f "$out"/gpu-* benchmarks/results/ 2>/dev/null || true
