"""A small CLIP on scikit-learn's 8×8 digits with fastnce.losses.ClipLoss (or SigLipLoss), then
zero-shot classification from class-name prompts.

    python examples/clip_digits.py [--epochs 30] [--loss clip|siglip]

Each training image is paired with a caption naming its digit ("a digit: seven", "the number
seven", ...). The text encoder sees only characters: a bag of hashed character trigrams of the
caption, then an MLP, so it must learn what the letters of "seven" mean from the pairing.
Zero-shot: the test images are classified by their nearest class prompt, built with templates
never used in training ("a photo of a seven.", ...), and compared with the same model untrained.
"""
import argparse
import copy
import os
import sys
import zlib

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _digits import Encoder, augment, digits, features  # noqa: E402

from fastnce.losses import ClipLoss, SigLipLoss, zero_shot_predict  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_TEMPLATES = ["a digit: {}", "the number {}", "a handwritten {}", "an image of {}", "{}", "this is a {}"]
TEST_TEMPLATES = ["a photo of a {}.", "a small picture of the digit {}", "{} written by hand"]
BUCKETS = 4096


def trigrams(text):
    """Hashed character trigrams of the text padded with spaces (crc32, deterministic)."""
    t = f"  {text.lower()} "
    return [zlib.crc32(t[i:i + 3].encode()) % BUCKETS for i in range(len(t) - 2)]


def tokenize(texts):
    ids = [trigrams(t) for t in texts]
    offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
    return torch.tensor([j for i in ids for j in i]), offsets


class TextEncoder(nn.Module):
    """Bag of character trigrams (mean of their embeddings) → MLP → (B, dim)."""

    def __init__(self, dim=64, width=128):
        super().__init__()
        self.bag = nn.EmbeddingBag(BUCKETS, width, mode="mean")
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))

    def forward(self, texts):
        return self.mlp(self.bag(*tokenize(texts)))


class ImageEncoder(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.backbone = Encoder(128)
        self.proj = nn.Linear(128, dim)

    def forward(self, x):
        return self.proj(self.backbone(x))


@torch.no_grad()
def zero_shot_accuracy(image_encoder, text_encoder, x, y):
    text_encoder.eval()
    # one embedding per class: the mean of its normalised prompt embeddings (as CLIP's ensembling)
    prompts = [[t.format(n) for t in TEST_TEMPLATES] for n in NAMES]
    cls = torch.stack([nn.functional.normalize(text_encoder(p), dim=1).mean(0) for p in prompts])
    pred = zero_shot_predict(features(image_encoder, x), cls)
    return (pred == y).float().mean().item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=("clip", "siglip"), default="clip",
                   help="CLIP's softmax loss, or SigLIP's sigmoid loss (its learnable bias too)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = digits(args.seed)

    image_encoder, text_encoder = ImageEncoder(), TextEncoder()
    untrained = (copy.deepcopy(image_encoder), copy.deepcopy(text_encoder))
    # learnable logit scale, clamped at 100 (SigLIP: scale 10 and bias −10 to start, as its paper)
    loss_fn = ClipLoss(init_temperature=0.07) if args.loss == "clip" else SigLipLoss()
    params = list(image_encoder.parameters()) + list(text_encoder.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * ((len(x_tr) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)

    bar = tqdm(total=steps, desc="CLIP" if args.loss == "clip" else "SigLIP")
    for _ in range(args.epochs):
        image_encoder.train(), text_encoder.train()
        for idx in torch.randperm(len(x_tr), generator=g).split(args.batch):
            templates = torch.randint(0, len(TRAIN_TEMPLATES), (len(idx),), generator=g).tolist()
            captions = [TRAIN_TEMPLATES[t].format(NAMES[int(c)]) for t, c in zip(templates, y_tr[idx])]
            loss = loss_fn(image_encoder(augment(x_tr[idx], g)), text_encoder(captions))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{loss_fn.scale().item():.1f}")
    bar.close()

    acc_untrained = zero_shot_accuracy(*untrained, x_te, y_te)
    acc_trained = zero_shot_accuracy(image_encoder, text_encoder, x_te, y_te)
    print(f"zero-shot accuracy (unseen prompt templates), untrained: {acc_untrained:.3f}")
    print(f"zero-shot accuracy (unseen prompt templates), trained:   {acc_trained:.3f}")


if __name__ == "__main__":
    main()
