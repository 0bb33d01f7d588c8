"""Metadata is in pyproject.toml; this file only decides whether to build fastnce._C.

FASTNCE_BUILD_CUDA=1 forces the CUDA extension, =0 skips it; unset, it is built when torch is
a CUDA build and nvcc is found. Without it the package is pure Python and the `cuda` backend
compiles csrc/ on first use (torch.utils.cpp_extension.load, cached).

torch must be importable here for the extension, which pip's build isolation prevents (the
isolated build environment has only setuptools and wheel), so build it with

    FASTNCE_BUILD_CUDA=1 pip install --no-build-isolation -e .

TORCH_CUDA_ARCH_LIST picks the GPU architectures (default '8.0;9.0').

The CUDA sources live in csrc/ at the top of the repository. Editable installs read them there;
regular installs (wheels) carry a copy as package data in fastnce/_csrc/ (see build_py below),
and sdists take csrc/ through MANIFEST.in. fastnce/ops/cuda_lse.py looks in both places.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCES = ["csrc/lse_ops.cpp", "csrc/lse_kernels.cu"]  # relative: setuptools wants them so
SHIPPED = ("*.h", "*.cuh", "*.cu", "*.cpp")  # copied to fastnce/_csrc (not csrc/emu: tests only)


class build_py_with_csrc(build_py):
    """Also copy csrc/ into the built package as fastnce/_csrc, for the JIT path."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not CSRC.is_dir():
            return  # an editable install reads csrc/ from the checkout
        dst = Path(self.build_lib) / "fastnce" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for pattern in SHIPPED:
            for f in CSRC.glob(pattern):
                shutil.copy2(f, dst / f.name)


def _log(msg: str) -> None:
    print(f"fastnce setup.py: {msg}", file=sys.stderr)


def cuda_extension():
    """(ext_modules, cmdclass additions) for fastnce._C, or ([], {}) for a pure-Python install."""
    flag = os.environ.get("FASTNCE_BUILD_CUDA", "").strip()
    if flag == "0":
        _log("FASTNCE_BUILD_CUDA=0: not building the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        if flag == "1":
            raise SystemExit(
                f"FASTNCE_BUILD_CUDA=1 but torch cannot be imported here ({e}); with pip, build without "
                "isolation: FASTNCE_BUILD_CUDA=1 pip install --no-build-isolation -e ."
            )
        _log("torch is not importable in this (isolated?) build: pure-Python install; the cuda backend "
             "compiles on first use. To build it now: FASTNCE_BUILD_CUDA=1 pip install --no-build-isolation -e .")
        return [], {}
    if flag != "1":
        if torch.version.cuda is None:
            _log("torch is a CPU-only build: not building the CUDA extension")
            return [], {}
        if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            _log("nvcc not found (set CUDA_HOME): not building the CUDA extension")
            return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    _log(f"building fastnce._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        "fastnce._C",
        SOURCES,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
cmdclass["build_py"] = build_py_with_csrc
setup(ext_modules=ext_modules, cmdclass=cmdclass)
