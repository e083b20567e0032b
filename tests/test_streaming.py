"""A train split larger than what it may take in memory: image folders stream through the DataLoader batch
by batch (core.data.LazyRows), so peak memory stays flat as the folder grows; val and test are capped by
data.max_eval_samples and made once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL", reason="Pillow is not installed (pip install edgebundle[images])")
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory read from /proc (Linux)")

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from torch import nn
    from edgebundle.core.data import load_dataset
    from edgebundle.core.recipe import Recipe, TrainStage
    from edgebundle.stages.training import train_supervised

    def peak_mib():  # this process's own high-water mark (ru_maxrss would carry a big parent's over exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    folder, eager = sys.argv[1], sys.argv[2] == "eager"
    recipe = Recipe.model_validate({
        "version": 1, "name": "stream", "model": {"factory": "x:y"},
        "inputs": [{"name": "image", "shape": [1, 3, 96, 96], "dtype": "float32"}],
        "data": {"kind": "images", "path": folder, "splits": {"train": 0.9, "val": 0.05, "test": 0.05},
                 "max_eval_samples": 16}})
    ds = load_dataset(recipe)
    train = ds.train
    if eager:  # what holding the whole train split in memory costs, for comparison
        from edgebundle.core.data import Split
        train = Split({"image": np.asarray(train.inputs["image"])}, train.labels)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    fit = train_supervised(model, train, ds.val, ["image"], TrainStage(epochs=1, batch_size=32), seed=0,
                           device=torch.device("cpu"))
    print(json.dumps({"train": len(ds.train), "val": len(ds.val), "test": len(ds.test),
                      "maxrss_mib": peak_mib()}))
""")


def _folder(root: Path, n: int) -> Path:
    """n 96x96 JPEG files (varied shifts of a real photo) in two class sub-folders."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china = load_sample_images().images[0]
    for i in range(n):
        d = root / ("temple" if i % 2 else "other")
        d.mkdir(parents=True, exist_ok=True)
        y, x = (i * 7) % 300, (i * 13) % 500
        Image.fromarray(np.ascontiguousarray(china[y:y + 96, x:x + 96])).save(d / f"{i:05d}.jpg", quality=80)
    return root


def _peak(folder: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), mode], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_stays_flat_as_the_image_folder_grows(tmp_path):
    small, large = _folder(tmp_path / "small", 100), _folder(tmp_path / "large", 2000)
    a, b = _peak(small, "stream"), _peak(large, "stream")
    assert b["train"] == 1800 and b["val"] == b["test"] == 16  # capped by max_eval_samples
    decoded = (b["train"] - a["train"]) * 3 * 96 * 96 * 4 / 2**20  # MiB of the extra train rows, decoded
    assert decoded > 180
    assert b["maxrss_mib"] - a["maxrss_mib"] < 0.3 * decoded, (a, b)
    # the same measurement sees the difference when the split is held whole
    eager = _peak(large, "eager")
    assert eager["maxrss_mib"] - b["maxrss_mib"] > 0.6 * decoded, (b, eager)
