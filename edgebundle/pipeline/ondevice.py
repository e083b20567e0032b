"""Bundles measured on the device that will run them: the artifact, the device runner and the test inputs are
pushed, the runner times the artifact with the host's protocol and runs the test split there, and the host
judges the device's own outputs against the bundle's contract. Each measurement is a record in the manifest.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgebundle.core import device_runner
from edgebundle.core.data import Split, iter_feeds
from edgebundle.core.errors import DeviceError
from edgebundle.core.host import hardware_id
from edgebundle.core.measure import LatencyStats, summarize
from edgebundle.core.recipe import DeviceSpec, MeasureSpec, Recipe
from edgebundle.devices import open_device

BATCH = 64  # the test split goes in batches of this many where the batch axis allows (as on the host)


@dataclass(frozen=True)
class Artifact:
    """What the runner needs of a bundle: its folder, files, model file, runtime and session settings."""

    folder: Path
    files: tuple[str, ...]
    model_file: str
    runtime: str  # the target's runtime: onnxruntime | openvino | executorch | ...
    settings: dict[str, Any]
    threads: int | None  # the recipe's threads; None: the device's usable cores


@dataclass(frozen=True)
class DeviceRun:
    spec: DeviceSpec
    description: dict[str, Any]
    latency: LatencyStats | None  # None: the device's benchmark binary printed no per-iteration figures
    outputs: list[np.ndarray] | None  # every output over the test split, in order (None: not run)
    seconds: float
    summary: dict[str, Any] | None = None  # what a benchmark binary printed (adb), where latency is None


def _job_inputs(path: Path, feeds: dict[str, np.ndarray], test: Split | None, recipe: Recipe | None) -> int:
    arrays = {f"measure/{k}": np.asarray(v) for k, v in feeds.items()}
    n = 0
    if test is not None and recipe is not None:
        for n, batch in enumerate(iter_feeds(test, recipe.inputs, BATCH), start=1):
            arrays.update({f"b{n - 1}/{k}": np.asarray(v) for k, v in batch.items()})
    np.savez(path, **arrays)
    return n


def run_on_device(spec: DeviceSpec, art: Artifact, measure: MeasureSpec, feeds: dict[str, np.ndarray], *,
                  test: Split | None = None, recipe: Recipe | None = None) -> DeviceRun:
    """Push, run the runner, pull, clean up. DeviceError (naming the device) when any step fails."""
    import time

    if spec.kind == "adb":
        return _benchmark_on_adb(spec, art, measure, feeds)
    if art.runtime not in device_runner.RUNTIMES:
        raise DeviceError(f"device {spec.label}: the device runner cannot run {art.runtime} artifacts (it runs "
                          f"{', '.join(device_runner.RUNTIMES)})")
    device = open_device(spec)
    remote = f"{spec.workdir.rstrip('/')}/job-{uuid.uuid4().hex[:12]}"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgebundle-device-") as tmp:
        tmp = Path(tmp)
        batches = _job_inputs(tmp / "inputs.npz", feeds, test, recipe)
        job = {"runtime": art.runtime, "model_file": art.model_file, "threads": art.threads, "settings": art.settings,
               "measure": {"warmup_min": measure.warmup_min, "warmup_max": measure.warmup_max,
                           "iterations": measure.iterations, "time_budget_s": measure.time_budget_s}}
        (tmp / "job.json").write_text(json.dumps(job), encoding="utf-8")
        try:
            device.push([Path(device_runner.__file__), tmp / "job.json", tmp / "inputs.npz",
                         *[art.folder / f for f in art.files]], remote)
            ran = device.run(["python", "device_runner.py", "job.json"], cwd=remote)
            if ran.returncode != 0:
                raise DeviceError(f"device {spec.label}: the runner failed: {ran.last_line()}")
            device.pull([f"{remote}/result.json"] + ([f"{remote}/outputs.npz"] if batches else []), tmp)
        finally:
            if device.reached:  # a device never reached is not asked again (one timeout, not two)
                device.remove(remote)
        result = json.loads((tmp / "result.json").read_text(encoding="utf-8"))
        outputs = None
        if batches:
            with np.load(tmp / "outputs.npz") as z:
                outputs = [z[f"o{j}"] for j in range(len(z.files))]
    batch = len(next(iter(feeds.values())))
    lat = summarize(np.array(result["samples_ms"]), batch=batch, threads=result["threads"],
                    warmup=result["warmup_iterations"], stable=result["warmup_stable"])
    desc = {**result["device"], "id": hardware_id(result["device"]), "taken": result["taken"]}
    return DeviceRun(spec, desc, lat, outputs, time.perf_counter() - start)


def _benchmark_on_adb(spec: DeviceSpec, art: Artifact, measure: MeasureSpec, feeds: dict[str, np.ndarray]
                      ) -> DeviceRun:
    """adb: the artifact pushed, the runtime's own benchmark binary (spec.runner, already on the device) run on
    it, its latency lines parsed. Its outputs are not judged (the binaries run their own inputs)."""
    import time

    from edgebundle.devices.adb import benchmark_argv, parse_benchmark

    device = open_device(spec)
    remote = f"{spec.workdir.rstrip('/')}/job-{uuid.uuid4().hex[:12]}"
    start = time.perf_counter()
    desc = device.describe()
    try:
        device.push([art.folder / f for f in art.files], remote)
        runs = measure.iterations + measure.warmup_min  # the binaries warm up inside their own runs
        ran = device.run(benchmark_argv(spec.runner, art.model_file, runs=runs, threads=art.threads), cwd=remote)
        if ran.returncode != 0:
            raise DeviceError(f"device {spec.label}: {spec.runner} failed: {ran.last_line()}")
        out = parse_benchmark(ran.stdout + "\n" + ran.stderr, spec.runner)
    finally:
        if device.reached:
            device.remove(remote)
    batch = len(next(iter(feeds.values())))
    if out.samples_ms:
        lat = summarize(np.array(out.samples_ms), batch=batch, threads=art.threads or 0)
    else:
        lat = None
    desc.update(id=hardware_id(desc), taken=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                runtime={Path(spec.runner).name: "the device's"}, benchmark=out.how)
    return DeviceRun(spec, desc, lat, None, time.perf_counter() - start,
                     summary={"mean_ms": out.mean_ms, "p50_ms": out.p50_ms, "runs": out.runs, "how": out.how,
                              "samples_ms": list(out.samples_ms)})


def figure_kind(spec: DeviceSpec, description: dict[str, Any], build_host: dict[str, Any] | None) -> str:
    """'device', or 'build host' where the device is the machine kind the bundle was built on, or 'emulator'
    where the device runs under one (its Python started by qemu, or a CPU that says so): such a figure is
    labelled so and never shown as a device figure."""
    import platform

    other_arch = spec.kind == "local" and description.get("machine") != platform.machine()  # only emulated here
    if ("qemu" in spec.python.lower() or "qemu" in str(description.get("cpu", "")).lower()
            or description.get("emulator") or other_arch):
        return "emulator"
    if build_host and description.get("id") == build_host.get("id"):
        return "build host"
    return "device"


def record(run: DeviceRun, verdict: Any | None, build_host: dict[str, Any] | None, note: str | None = None
           ) -> dict[str, Any]:
    """One device measurement as the manifest keeps it."""
    s = run.spec
    desc = run.description
    acc = None
    if verdict is not None:
        acc = {"metric": verdict.metric, "value": verdict.value, "reference_value": verdict.reference,
               "drop": verdict.drop, "within_budget": verdict.within, "samples": verdict.samples,
               "budget": verdict.budget, "line": verdict.line(),
               "interval": list(verdict.interval) if verdict.interval else None, "groups": verdict.groups,
               "details": verdict.details}
    runtime = ", ".join(f"{k} {v}" for k, v in desc.get("runtime", {}).items())
    how = (f"{s.runner} over adb, {desc.get('benchmark')}" if s.kind == "adb" else
           f"edgebundle's device runner over {s.kind} "
           f"({'this Python' if s.kind == 'local' and s.python == 'python3' else s.python}), "
           f"{runtime}, {run.latency.threads} threads")
    return {
        "device": s.label, "kind": s.kind, "figure": figure_kind(s, desc, build_host),
        "fingerprint": {k: v for k, v in desc.items() if k != "taken"},
        "taken": desc.get("taken") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "how": how,
        "latency": run.latency.to_dict() if run.latency is not None else run.summary,
        "accuracy": acc,
        "note": note,
        "seconds": round(run.seconds, 1),
    }


def judge_outputs(run: DeviceRun, output_index: int, judge: Callable[[np.ndarray], Any]) -> Any:
    """The verdict on the device's outputs, or None where the run brought none back (a benchmark binary)."""
    if run.outputs is None:
        return None
    if len(run.outputs) <= output_index:
        raise DeviceError(f"device {run.spec.label}: the runner returned {len(run.outputs)} output(s); the metric "
                          f"judges number {output_index + 1}")
    return judge(run.outputs[output_index])


def rejection(target: str, rec: dict[str, Any], on_host: str | None = None) -> str:
    """The one line of a bundle over budget on its device (and where it stands on the build host, if known)."""
    fp = rec["fingerprint"]
    what = f"{fp.get('cpu')}, {fp.get('machine')}" + (f", {rec['figure']}" if rec["figure"] != "device" else "")
    line = f"{target}: on device {rec['device']} ({what}) {rec['accuracy']['line']} missed the budget"
    return line + (f"; on this host it is at {on_host}: the device's own kernels lose what this host's keep"
                   if on_host else "")
