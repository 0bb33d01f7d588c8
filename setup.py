"""Metadata is in pyproject.toml; this file only decides whether to build fastnce._C.

FASTNCE_BUILD_CUDA=1 forces the CUDA extension, =0 skips it; unset, it is built when torch is
a CUDA build and nvcc is found. Without it the package is pure Python and the `cuda` backend
compiles csrc/ on first use.
"""
from setuptools import setup

setup()
