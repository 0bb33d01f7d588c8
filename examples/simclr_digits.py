"""SimCLR on scikit-learn's 8×8 digits with fastnce.losses.NTXentLoss, then a linear probe.

    python examples/simclr_digits.py [--epochs 60]

Trains a small CNN without labels on two augmented views per image (shifts, zoom crops, pixel
dropout, noise), then fits a logistic-regression probe on the frozen representations (with all training labels,
and with only 5 labelled images per class) and prints its test accuracy next to the same probe
on an untrained (randomly initialised) encoder.
A few minutes on a laptop CPU.
"""
import argparse
import copy
import os
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _digits import Encoder, augment, digits, features  # noqa: E402

from fastnce.losses import NTXentLoss  # noqa: E402


def probe_accuracy(encoder, x_tr, y_tr, x_te, y_te, per_class=None, draws=5):
    """Test accuracy of a logistic-regression probe on frozen features, trained on all labels
    or on `per_class` labelled images per class (mean over `draws` random draws)."""
    f_tr, f_te = features(encoder, x_tr).numpy(), features(encoder, x_te).numpy()
    y_tr, y_te = y_tr.numpy(), y_te.numpy()
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(1 if per_class is None else draws):
        if per_class is None:
            idx = np.arange(len(y_tr))
        else:
            idx = np.concatenate([rng.choice(np.flatnonzero(y_tr == c), per_class, replace=False) for c in range(10)])
        scaler = StandardScaler().fit(f_tr[idx])
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(f_tr[idx]), y_tr[idx])
        scores.append(clf.score(scaler.transform(f_te), y_te))
    return float(np.mean(scores))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = digits(args.seed)

    encoder = Encoder(128)
    untrained = copy.deepcopy(encoder)
    head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    loss_fn = NTXentLoss(temperature=args.temperature)  # backend 'auto': the tiled torch path on CPU
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * ((len(x_tr) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)

    bar = tqdm(total=steps, desc="SimCLR")
    for _ in range(args.epochs):
        encoder.train(), head.train()
        for idx in torch.randperm(len(x_tr), generator=g).split(args.batch):
            x = x_tr[idx]
            z1, z2 = head(encoder(augment(x, g))), head(encoder(augment(x, g)))
            loss = loss_fn(z1, z2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    for per_class in (None, 5):
        what = "all labels" if per_class is None else f"{per_class} labels per class"
        acc_untrained = probe_accuracy(untrained, x_tr, y_tr, x_te, y_te, per_class)
        acc_trained = probe_accuracy(encoder, x_tr, y_tr, x_te, y_te, per_class)
        print(f"linear probe accuracy ({what}), untrained encoder: {acc_untrained:.3f}")
        print(f"linear probe accuracy ({what}), SimCLR encoder:    {acc_trained:.3f}")


if __name__ == "__main__":
    main()
