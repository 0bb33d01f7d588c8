"""The examples run end to end (one epoch; their full runs and accuracies are in the README)."""
import pathlib
import subprocess
import sys

import pytest


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script,expect", [("simclr_digits.py", "linear probe accuracy"),
                                           ("clip_digits.py", "zero-shot accuracy"),
                                           ("clip_digits.py --loss siglip", "zero-shot accuracy")])
def test_example_runs(script, expect):
    pytest.importorskip("sklearn")
    script, *flags = script.split()
    out = subprocess.run([sys.executable, str(EXAMPLES / script), "--epochs", "1", *flags], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert expect in out.stdout


@pytest.mark.parametrize("scheme", ["ring", "gather"])
def test_distributed_example_under_torchrun(scheme):
    """Two gloo processes on this machine; --check compares step 0 with the single-process loss."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(EXAMPLES / "distributed_clip.py"), "--steps", "2", "--check", "--scheme", scheme],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "check: distributed" in out.stdout
