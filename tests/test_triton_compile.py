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
    # 6 kernel variants x (D = 128, 512) x (bf16, fp32), the half backward at D = 128 (bf16, fp32), the merge;
    # SigLIP's 3 kernels x 4 (D, dtype) pairs
    assert out.stdout.count("compiled ") == 39


def test_every_benchmark_kernel_has_a_spill_free_autotune_candidate_on_sm90():
    """What ptxas makes of each autotune candidate at the GPU benchmark's shapes: the autotuner
    can only pick a fast config if at least one per kernel variant keeps its tiles in registers."""
    script = pathlib.Path(__file__).with_name("triton_aot.py")
    out = subprocess.run([sys.executable, str(script), "90", "--configs"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    spill_free: dict[str, int] = {}
    for line in out.stdout.splitlines():
        if line.startswith("config "):
            variant = line[len("config "):].split("|")[0].strip()
            spill = int(line.rsplit("spill=", 1)[1].split()[0])
            spill_free[variant] = spill_free.get(variant, 0) + (spill == 0)
    assert set(spill_free) == {"simclr fwd", "simclr fwd half", "simclr bwd sym", "simclr bwd half", "clip panel",
                               "clip panel D=128", "clip bwd atomic", "clip bwd two-pass", "siglip fwd", "siglip bwd",
                               "siglip bwd atomic"}, out.stdout
    assert all(spill_free.values()), out.stdout


def test_autotuned_kernels_keep_their_choice_in_tritons_disk_cache():
    """A later process skips the benchmarking of every autotuned kernel (checked without the
    interpreter, under which Triton turns the disk cache off)."""
    import os

    code = ("from fastnce.ops import triton_lse as T, triton_sigmoid as TS\n"
            "assert all(tuned.cache_results for _, tuned in T._KERNELS.values()), T._KERNELS\n"
            "assert all(tuned.cache_results for _, tuned, _ in TS._KERNELS.values()), TS._KERNELS\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
