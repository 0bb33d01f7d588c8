"""OpenCLIP's losses (open_clip/loss.py: ClipLoss, SigLipLoss) for the tests to compare with.

The file is loaded on its own: open_clip/__init__ imports its models, timm and torchvision,
which the losses do not need. `open_clip_loss` is None when open_clip_torch is not installed.
"""
import importlib.util
import os


def _load():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    s = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    return module


open_clip_loss = _load()
