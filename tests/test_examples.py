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


def test_readme_tour_runs():
    """The README's tour, executed with small random stand-ins for the tensors it names."""
    import re

    import torch

    import fastnce

    readme = (EXAMPLES.parent / "README.md").read_text()
    tour = re.search(r"## A tour\n\n```python\n(.*?)```", readme, re.S).group(1)
    N, D = 8, 16
    r = lambda *shape: torch.randn(*shape)
    names = dict(query=r(N, D), positive_key=r(N, D), negative_keys=r(11, D), negatives_nmd=r(N, 5, D),
                 z1=r(N, D), z2=r(N, D), image_features=r(N, D), text_features=r(N, D),
                 logit_scale=torch.tensor(2.0), logit_bias=torch.tensor(-10.0), q=r(N, 128), k=r(N, 128),
                 embeddings=r(N, D), labels=torch.randint(0, 3, (N,)), view1=r(N, D), view2=r(N, D),
                 view3=r(N, D), scale=10.0, bias=None, y=torch.randint(0, 3, (N,)), yk=torch.randint(0, 3, (N,)))
    env = dict(torch=torch, fastnce=fastnce, **names)
    exec(tour, env)
    assert torch.isfinite(env["loss"]) and env["row_lse"].shape == (N,)
