#!/usr/bin/env bash
# Build fastnce._C for the device machine (Python 3.12, torch 2.11.0+cu130, sm_90: H100/H200)
# here, without a GPU, into carry/ for benchmarks/gpu_session.sh; a few minutes on 2 cores.
# Uses (or makes) a venv at ${VENV:-/tmp/fastnce-device-venv} with that torch from PyPI
# (~5 GB download). From the repository root: bash benchmarks/build_device_ext.sh
set -eu
venv=${VENV:-/tmp/fastnce-device-venv}
py=${PYTHON312:-$(command -v python3.12 || echo "$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12")}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.11.0 setuptools wheel ninja numpy
fi
build=$(mktemp -d)
git ls-files -z | xargs -0 cp --parents -t "$build"
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
(cd "$build" && FASTNCE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 "$venv/bin/python" setup.py -q build_ext --inplace)
mkdir -p carry
cp "$build"/fastnce/_C.cpython-312-*.so carry/
# the sources it was built from: gpu_session.sh uses it only while csrc/ is unchanged
bash benchmarks/csrc_sha.sh > carry/_C.csrc-sha256
rm -rf "$build"
ls -l carry/_C.cpython-312-*.so
