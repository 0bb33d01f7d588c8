"""Shared bits of the digits examples: data, augmentations, a small CNN encoder."""
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def digits(seed=0):
    """scikit-learn's 8×8 digits as float tensors in [0, 1]: (x_train, y_train, x_test, y_test)."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


def augment(x, g=None):
    """Random view of a batch (B, 1, 8, 8): random crop of the 2-pixel padded image (shift up to
    ±1), random rescale-crop (zoom), pixel dropout, Gaussian noise and contrast jitter."""
    B = x.shape[0]
    # zoom: crop a 6×6 or 7×7 window and resize it back to 8×8 for half the batch
    zoom = torch.rand(B, generator=g) < 0.5
    if zoom.any():
        s = int(torch.randint(6, 8, (1,), generator=g))
        i, j = torch.randint(0, 9 - s, (2,), generator=g).tolist()
        x = x.clone()
        x[zoom] = F.interpolate(x[zoom, :, i:i + s, j:j + s], size=(8, 8), mode="bilinear", align_corners=False)
    # shift: pad 1 and crop 8×8 at a random offset per sample
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (B,), generator=g)
    dy = torch.randint(0, 3, (B,), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(B, 8, 8)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(B, 8, 8)
    x = padded[torch.arange(B)[:, None, None], 0, rows, cols][:, None]
    # pixel dropout, contrast, noise
    x = x * (torch.rand(x.shape, generator=g) > 0.1)
    x = x * (0.7 + 0.6 * torch.rand(B, 1, 1, 1, generator=g))
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    return x


class Encoder(nn.Module):
    """Small CNN: (B, 1, 8, 8) → (B, dim) representation."""

    def __init__(self, dim=128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4, dim),
        )

    def forward(self, x):
        return self.net(x)


@torch.no_grad()
def features(encoder, x, batch=512):
    encoder.eval()
    return torch.cat([encoder(x[i:i + batch]) for i in range(0, len(x), batch)])
