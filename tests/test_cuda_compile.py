"""csrc/ compiles: every .cu for sm_80 and sm_90a, the op registration .cpp once, with nvcc -c
against the installed torch's headers and with torch's own extension flags. No GPU needed, no
link; a compile error fails CI. Skipped without nvcc.

Budget: about a minute on 2 cores (two nvcc processes at a time).
"""
from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
ARCHS = ("80", "90a")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _cuda_include() -> Path | None:
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        cands.append(str(Path(os.path.realpath(NVCC)).parent.parent))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c) / "include"
    return None


def _torch_flags() -> list[str]:
    from torch.utils import cpp_extension

    std = "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"
    inc = [f"-I{p}" for p in cpp_extension.include_paths()]
    inc.append(f"-I{sysconfig.get_paths()['include']}")
    cuda_inc = _cuda_include()
    if cuda_inc is not None:
        inc.append(f"-I{cuda_inc}")
    flags = [
        f"-std={std}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-Xcompiler", "-fPIC",
        "-O3",
    ] + inc
    # A CPU-only torch wheel ships the c10/cuda headers without the generated config header.
    torch_inc = Path(cpp_extension.include_paths()[0])
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _jobs():
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    base = _torch_flags()
    jobs = []
    for cu in sorted(CSRC.glob("*.cu")):
        for arch in ARCHS:
            jobs.append((f"{cu.name}[sm_{arch}]", [NVCC, "-c", str(cu), *base, *COMMON_NVCC_FLAGS,
                                                    f"-gencode=arch=compute_{arch},code=sm_{arch}",
                                                    "-Xptxas", "-v"]))
    for cpp in sorted(CSRC.glob("*.cpp")):  # host code: one compile, no arch
        jobs.append((cpp.name, [NVCC, "-c", str(cpp), *base]))
    return jobs


def _ptxas_report(text: str) -> list[dict]:
    """ptxas -v's lines, one dict per function: name (mangled), arch, entry (a kernel, or a
    device function ptxas kept), spill (bytes stored + loaded), stack (bytes), and registers
    (kernels). The spill line belongs to the function of the "Function properties for" line
    before it; the registers line to the kernel being compiled."""
    functions: list[dict] = []
    arch, kernel, current = None, None, None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            arch = m[2]
            kernel = dict(name=m[1], arch=arch, entry=True)
            functions.append(kernel)
        elif m := re.search(r"Function properties for (\S+)", line):
            current = next((f for f in functions if f["name"] == m[1] and f["arch"] == arch), None)
            if current is None:
                current = dict(name=m[1], arch=arch, entry=False)
                functions.append(current)
        elif current is not None and (m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack=int(m[1]), spill=int(m[2]) + int(m[3]))
        elif kernel is not None and (m := re.search(r"Used (\d+) registers", line)):
            kernel["registers"] = int(m[1])
    return functions


def test_ptxas_report_reads_each_function():
    """The spill line after "Function properties for f" is f's, also when f is a device
    function listed after the last kernel."""
    text = """ptxas info    : Compiling entry function '_Z2k1Pf' for 'sm_90a'
ptxas info    : Function properties for _Z2k1Pf
    0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z2k2Pf' for 'sm_90a'
ptxas info    : Function properties for _Z2k2Pf
    16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
ptxas info    : Function properties for _Z1fPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"""
    assert _ptxas_report(text) == [
        dict(name="_Z2k1Pf", arch="sm_90a", entry=True, stack=0, spill=16, registers=40),
        dict(name="_Z2k2Pf", arch="sm_90a", entry=True, stack=16, spill=8, registers=32),
        dict(name="_Z1fPfi", arch="sm_90a", entry=False, stack=0, spill=0),
    ]


def _plan_constant(name: str) -> int:
    return int(re.search(rf"constexpr int {name} = (\d+);", (CSRC / "lse_plan.h").read_text())[1])


@pytest.fixture(scope="module")
def compiled():
    """Every job's (name, CompletedProcess); the .cu jobs with ptxas -v's report on stderr."""
    jobs = _jobs()
    assert any(name.startswith("lse_kernels.cu") for name, _ in jobs)
    with tempfile.TemporaryDirectory() as tmp:
        def run(job):
            name, cmd = job
            out = Path(tmp) / (name.replace("[", "_").replace("]", "") + ".o")
            r = subprocess.run(cmd + ["-o", str(out)], capture_output=True, text=True, timeout=600)
            return name, r

        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(run, jobs))


def test_csrc_compiles(compiled):
    failed = [(n, r) for n, r in compiled if r.returncode != 0]
    msg = "\n\n".join(f"== {n} ==\n{r.stderr[-6000:]}" for n, r in failed)
    assert not failed, f"nvcc failed:\n{msg}"


def test_kernels_keep_to_their_registers(compiled):
    """What ptxas made of every kernel (and any device function it kept), on sm_80 and sm_90a:
    no spills, no stack (a tile's accumulators in local memory would cost more than the
    products). The forward's __launch_bounds__ hold it within the registers that let
    kForwardBlocksPerSm blocks share a multiprocessor, which the launch plan counts on
    (lse_plan.h's forward_resident): the spill check is what sees that bound cost something;
    the register check, that the bound is still there."""
    report = [k for n, r in compiled if n.startswith("lse_kernels.cu") for k in _ptxas_report(r.stderr)]
    assert {k["arch"] for k in report} == {f"sm_{a}" for a in ARCHS}
    names = {k["name"] for k in report if k["entry"]}
    for kernel in ("lse_forward_kernel", "lse_backward_kernel", "lse_backward_wide_kernel"):
        assert any(kernel in n for n in names), f"ptxas reported no {kernel}"
    heavy = [k for k in report if k.get("spill", 1) or k.get("stack", 1) or (k["entry"] and "registers" not in k)]
    assert not heavy, heavy
    limit = 65536 // (_plan_constant("kThreads") * _plan_constant("kForwardBlocksPerSm"))
    over = [k for k in report if "lse_forward_kernel" in k["name"] and k["registers"] > limit]
    assert not over, f"forward kernels above {limit} registers a thread: {over}"
