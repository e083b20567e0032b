"""Crops of a handful of real photos, and a small CNN that knows every photo: the shape of the photo examples
(many crops of few photos) at a size a test can distill in seconds.

Each of the 8 photos that ship with scikit-image, scikit-learn and matplotlib is cut into a left and a right
half: 16 sources. `data()` yields random resized crops of them (3 x 24 x 24) with the source as `group`
(`groups=False` leaves it out). `teacher()` is a CNN trained here, on crops drawn with another seed, to name
each crop's source: a stand-in for a pretrained network that knows every photo's content. A student
distilled from it on crops of some sources can only learn those: it agrees with the teacher on new crops of
the sources it saw, and not on the others.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

SIZE = 24
SOURCES = 16


@functools.lru_cache(maxsize=1)
def _sources() -> tuple[np.ndarray, ...]:
    import matplotlib.cbook
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    imgs = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
            skimage.data.stereo_motorcycle()[0], *load_sample_images().images]
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        imgs.append(np.asarray(im.convert("RGB")))
    halves = []
    for rgb in imgs:
        rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
        w = rgb.shape[1] // 2
        halves += [rgb[:, :w], rgb[:, w:]]
    return tuple(halves)


def _crop(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 0.8))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    im = Image.fromarray(np.ascontiguousarray(rgb[top:top + side, left:left + side])).resize((SIZE, SIZE),
                                                                                            Image.BILINEAR)
    return ((np.asarray(im, np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


def crops(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` crops cycling through the sources: (n x 3 x 24 x 24 float32, source ids)."""
    src, rng = _sources(), np.random.default_rng(seed)
    ids = np.arange(n) % len(src)
    return np.stack([_crop(src[i], rng) for i in ids]), ids


def data(n: int = 480, seed: int = 0, groups: bool = True):
    x, ids = crops(n, seed)
    for s in range(0, n, 60):
        yield {"image": x[s:s + 60], **({"group": ids[s:s + 60]} if groups else {})}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, SOURCES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict:
    """The teacher's weights, trained once per machine and kept in the temporary folder: a recipe imports this
    file afresh for every call of its factory, so an in-memory cache alone would train it again each time."""
    import hashlib
    import os
    import tempfile
    from pathlib import Path

    key = hashlib.sha256(Path(__file__).read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    cached = Path(tempfile.gettempdir()) / f"edgebundle-crops-teacher-{key}.pt"
    if cached.is_file():
        return torch.load(cached, weights_only=True)
    state = _train()
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, cached)
    return state


def _train() -> dict:
    torch.manual_seed(0)
    net = Net()
    x, y = crops(960, seed=1234)  # crops the recipe's data never holds
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        net.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def teacher() -> nn.Module:
    net = Net()
    net.load_state_dict(_trained_state())
    return net.eval()
