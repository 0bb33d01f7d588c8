"""The Triton kernels compile for an H100 (sm_90) with the GPU compiler, GPU or not."""
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_triton_kernels_compile_for_sm90():
    script = pathlib.Path(__file__).with_name("triton_aot.py")
    out = subprocess.run([sys.executable, str(script), "90"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.count("compiled ") == 11
