"""A bundle's outputs on the test split computed on the deployment ISA's arithmetic on a host that has more
(edgebundle.core.isa): in a child process either under `qemu-x86_64 -cpu <model>` (the numerics exactly,
not the timing: about 25x slower, so only outputs come back) or with the runtime's kernels capped at that
ISA through the child's environment (oneDNN's ONEDNN_MAX_CPU_ISA, read once per process: OpenVINO's CPU
plugin; native speed, so int8 can also be timed against fp32 there, `capped_ratio`).

The parent writes the feeds to a folder and runs this module as a child; the child opens the artifact with
the target's own `open` (the same session settings as the native verdict) and writes every output back.
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
                     inputs: list[InputSpec], cpu_model: str | None, timeout_s: float = 3600.0,
                     env: dict[str, str] | None = None) -> list[np.ndarray]:
    """Every output of the artifact over `split`, run in a child under qemu-x86_64 -cpu `cpu_model` (None: no
    emulator) with `env` added to its environment (a kernel cap)."""
    names = [s.name for s in inputs]
    with tempfile.TemporaryDirectory(prefix="edgebundle-emu-") as td:
        folder = Path(td)
        feeds = list(iter_feeds(split, inputs, 64))
        np.savez(folder / "in.npz", **{f"b{i}_{j}": f[n] for i, f in enumerate(feeds) for j, n in enumerate(names)})
        _child_run(folder, {"target": target, "model": str(Path(model_path).resolve()), "runtime": runtime,
                            "threads": threads, "batches": len(feeds), "names": names},
                   cpu_model, env, timeout_s, Path(model_path).name)
        with np.load(folder / "out.npz") as out:
            k = sum(1 for key in out.files if key.startswith("b0_"))
            return [np.concatenate([out[f"b{i}_{j}"] for i in range(len(feeds))]) for j in range(k)]


def capped_ratio(target: str, int8: Path, fp32: Path, runtime: dict[str, Any], threads: int,
                 feeds: dict[str, np.ndarray], env: dict[str, str], timeout_s: float = 600.0) -> dict[str, Any]:
    """int8 against fp32 on the same runtime, timed interleaved (core.measure.sequential_ratio) in a child
    whose kernels `env` caps at the deployment ISA: the Decision's fields."""
    with tempfile.TemporaryDirectory(prefix="edgebundle-cap-") as td:
        folder = Path(td)
        np.savez(folder / "in.npz", **feeds)
        _child_run(folder, {"target": target, "model": str(Path(int8).resolve()), "fp32": str(Path(fp32).resolve()),
                            "runtime": runtime, "threads": threads, "ratio": True},
                   None, env, timeout_s, Path(int8).name)
        return json.loads((folder / "out.json").read_text())


def _child_run(folder: Path, spec: dict[str, Any], cpu_model: str | None, env: dict[str, str] | None,
               timeout_s: float, what: str) -> None:
    (folder / SPEC).write_text(json.dumps(spec))
    prefix: list[str] = []
    where = ", ".join(f"{k}={v}" for k, v in (env or {}).items())
    if cpu_model is not None:
        emulator = qemu()
        if emulator is None:
            raise StageError("qemu-x86_64 is not installed (apt-get install qemu-user)")
        prefix, where = [emulator, "-cpu", cpu_model], f"qemu-x86_64 -cpu {cpu_model}"
    root = str(Path(__file__).resolve().parents[2])  # the edgebundle the parent runs, for the child too
    child_env = {**os.environ, **(env or {}),
                 "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [*prefix, sys.executable, "-m", "edgebundle.pipeline.emulated", str(folder)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env)
    except subprocess.TimeoutExpired as e:
        raise StageError(f"running {what} under {where} took over {timeout_s:.0f} s") from e
    done = (folder / "out.json").is_file() or (folder / "out.npz").is_file()
    if proc.returncode != 0 or not done:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "TCG doesn't support" not in ln]
        raise StageError(f"running {what} under {where} failed (exit {proc.returncode}): "
                         f"{lines[-1] if lines else 'no message'}")


def _child(folder: Path) -> None:
    from edgebundle.targets import registry

    spec = json.loads((folder / SPEC).read_text())
    target = registry.lookup(spec["target"]).factory()
    if spec.get("ratio"):
        _child_ratio(target, spec, folder)
        return
    out: dict[str, np.ndarray] = {}
    with np.load(folder / "in.npz") as data, \
            target.open(Path(spec["model"]), threads=spec["threads"], runtime=spec["runtime"]) as sess:
        for i in range(spec["batches"]):
            feeds = {n: data[f"b{i}_{j}"] for j, n in enumerate(spec["names"])}
            for j, o in enumerate(sess.run(feeds)):
                out[f"b{i}_{j}"] = np.asarray(o)
    np.savez(folder / "out.npz", **out)


def _child_ratio(target, spec: dict[str, Any], folder: Path) -> None:
    import dataclasses

    from edgebundle.core.measure import sequential_ratio

    with np.load(folder / "in.npz") as data:
        feeds = {k: data[k] for k in data.files}
    with target.open(Path(spec["model"]), threads=spec["threads"], runtime=spec["runtime"]) as q, \
            target.open(Path(spec["fp32"]), threads=spec["threads"], runtime=spec["runtime"]) as f:
        d = sequential_ratio(lambda: q.run(feeds), lambda: f.run(feeds))
    (folder / "out.json").write_text(json.dumps(dataclasses.asdict(d), default=float))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
