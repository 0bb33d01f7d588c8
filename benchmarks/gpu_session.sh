#!/usr/bin/env bash
# The prepared GPU check, for ONE call of the device tool (H100 or H200, about 9 minutes):
#   1. fastnce-bench gpu, triton and the anchors: the triton backend on float16 / bfloat16 /
#      float32 against the float64 reference, the bf16 matmul rate, then the must-shows first
#      (fastnce.bench.gpu.run_order: triton up to clip-128k, Inf-CL, torch.compile up to 32k,
#      triton's clip-1m, then the rest);
#   2. the NCCL test at world size 1 (issue 6);
#   3. the cuda backend, in a process of its own (kernels never run on a GPU before: a fault
#      there must not take step 1's numbers with it): its checks, simclr-16k to clip-128k, and
#      its forward with rows resident / streamed, appended to step 1's files;
#   4. the other `gpu`-marked tests, in what time is left;
#   5. if time is still left, siglip-32k (fastnce-triton, eager, torch.compile), appended too.
# Each step has its own deadline. From the repository root, with the Inf-CL wheel in carry/:
#   mkdir -p carry && cp ../shared/anchors/inf_cl-1.2.1-py3-none-any.whl carry/
#   optional, saves the ~1 min JIT build of csrc/ there: bash benchmarks/build_device_ext.sh
#   device run: bash benchmarks/gpu_session.sh    carry: ["carry"]    timeout_s: 560
# $OUT gets three files (the device tool brings back at most eight): gpu-session.log, and the
# bench's gpu-<card>-<date>.json and -meta.json, rewritten after every point; copies land in
# benchmarks/results/.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the device image's python3 holds torch; it may have no `python`
out=${OUT:-benchmarks/results}
mkdir -p "$out"
exec > >(tee -a "$out/gpu-session.log") 2>&1
tee_pid=$!
start=$(date +%s)
left_until() { echo $(($1 - ($(date +%s) - start))); }
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
  if $PY -c "import torch, fastnce._C" 2>/tmp/ext-load.log; then echo "using the carried $so"
  else echo "carried $so does not load ($(tail -1 /tmp/ext-load.log)): JIT build"; rm -f fastnce/_C.cpython-*.so; fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# pytest prints its summary when interrupted (SIGINT), and pytest-timeout (in the device image)
# stops a hanging test instead of the whole step
per_test=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=150")

echo "== 1. triton and the anchors"
timeout -k 10 320 $PY -m fastnce.bench gpu --out "$out" \
  --impls fastnce-triton,eager,torch.compile,inf-cl
echo "== 2. NCCL at world size 1"
# one fixed config per kernel (its float32 shapes would otherwise autotune ~70 candidates)
FASTNCE_TRITON_AUTOTUNE=0 timeout -s INT -k 10 90 $PY -m pytest -q -rfE -p no:cacheprovider $per_test \
  tests/test_distributed.py::test_nccl_world_size_one
left=$(left_until 460)
if [ "$left" -gt 45 ]; then
  echo "== 3. the cuda backend (${left} s)"
  timeout -k 10 "$left" $PY -m fastnce.bench gpu --out "$out" --append --gemm-size 0 \
    --impls fastnce-cuda --cases simclr-16k,clip-32k,clip-128k
fi
left=$(left_until 535)
if [ "$left" -gt 30 ]; then
  echo "== 4. the gpu tests (${left} s)"
  # the issues' must-shows first (offsets past 2**31), then the rest; no -x: a failure must
  # not hide the tests after it
  timeout -s INT -k 10 "$left" $PY -m pytest -q -rfE -m gpu -p no:cacheprovider $per_test \
    tests/test_edges.py tests/test_cuda.py tests/test_triton.py tests/test_siglip.py
fi
left=$(left_until 548)
if [ "$left" -gt 90 ]; then
  echo "== 5. siglip-32k (${left} s)"
  timeout -k 5 "$left" $PY -m fastnce.bench gpu --out "$out" --append --skip-check --gemm-size 0 \
    --cases siglip-32k --impls fastnce-triton,eager,torch.compile
fi
cp -f "$out"/gpu-* benchmarks/results/ 2>/dev/null || true
echo "== done ($(($(date +%s) - start)) s)"
exec >&- 2>&-  # tee sees the end of its input: let it write the last lines before the script ends
wait "$tee_pid" 2>/dev/null || true
