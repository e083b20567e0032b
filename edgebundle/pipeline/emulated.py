"""A bundle's outputs on the test split computed under `qemu-x86_64 -cpu <model>`: the deployment ISA's
int8 arithmetic reproduced on a host that has more (edgebundle.core.isa). QEMU reproduces the numerics
exactly, not the timing (about 25x slower): only outputs come back, never a latency.

The parent writes the feeds to a folder and runs this module as a child under the emulator; the child
opens the artifact with the target's own `open` (the same session settings as the native verdict) and
writes every output back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgebundle.core.data import Split, iter_feeds
from edgebundle.core.errors import StageError
from edgebundle.core.isa import qemu
from edgebundle.core.recipe import InputSpec

SPEC = "spec.json"


def emulated_outputs(target: str, model_path: Path, runtime: dict[str, Any], threads: int, split: Split,
                     inputs: list[InputSpec], cpu_model: str, timeout_s: float = 3600.0) -> list[np.ndarray]:
    """Every output of the artifact over `split`, run under qemu-x86_64 -cpu `cpu_model`."""
    emulator = qemu()
    if emulator is None:
        raise StageError("qemu-x86_64 is not installed (apt-get install qemu-user)")
    names = [s.name for s in inputs]
    with tempfile.TemporaryDirectory(prefix="edgebundle-emu-") as td:
        folder = Path(td)
        feeds = list(iter_feeds(split, inputs, 64))
        np.savez(folder / "in.npz", **{f"b{i}_{j}": f[n] for i, f in enumerate(feeds) for j, n in enumerate(names)})
        (folder / SPEC).write_text(json.dumps({"target": target, "model": str(Path(model_path).resolve()),
                                               "runtime": runtime, "threads": threads, "batches": len(feeds),
                                               "names": names}))
        root = str(Path(__file__).resolve().parents[2])  # the edgebundle the parent runs, for the child too
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        cmd = [emulator, "-cpu", cpu_model, sys.executable, "-m", "edgebundle.pipeline.emulated", str(folder)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as e:
            raise StageError(f"judging under qemu-x86_64 -cpu {cpu_model} took over {timeout_s:.0f} s") from e
        if proc.returncode != 0 or not (folder / "out.npz").is_file():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "TCG doesn't support" not in ln]
            raise StageError(f"running {Path(model_path).name} under qemu-x86_64 -cpu {cpu_model} failed "
                             f"(exit {proc.returncode}): {lines[-1] if lines else 'no message'}")
        with np.load(folder / "out.npz") as out:
            k = sum(1 for key in out.files if key.startswith("b0_"))
            return [np.concatenate([out[f"b{i}_{j}"] for i in range(len(feeds))]) for j in range(k)]


def _child(folder: Path) -> None:
    from edgebundle.targets import registry

    spec = json.loads((folder / SPEC).read_text())
    target = registry.lookup(spec["target"]).factory()
    out: dict[str, np.ndarray] = {}
    with np.load(folder / "in.npz") as data, \
            target.open(Path(spec["model"]), threads=spec["threads"], runtime=spec["runtime"]) as sess:
        for i in range(spec["batches"]):
            feeds = {n: data[f"b{i}_{j}"] for j, n in enumerate(spec["names"])}
            for j, o in enumerate(sess.run(feeds)):
                out[f"b{i}_{j}"] = np.asarray(o)
    np.savez(folder / "out.npz", **out)


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
