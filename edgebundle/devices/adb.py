"""A phone (or board) over adb: files pushed to a folder on the device, the runtime's own benchmark binary run
there (the user supplies it: ExecuTorch's executor_runner, ONNX Runtime's onnxruntime_perf_test, LiteRT's
benchmark_model), and its latency lines parsed. executor_runner can write its outputs (--output_file): those
come back and are judged; the others give latency only.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from edgebundle.core.errors import DeviceError
from edgebundle.devices.base import Ran, Remote, call, checked

ADB_TIMEOUT_S = 60


class AdbDevice(Remote):
    kind = "adb"

    def _adb(self, *args: str, what: str, timeout: float | None = None) -> Ran:
        return call(["adb", "-s", self.spec.adb, *args], what=what, device=self.spec.label,
                    timeout=timeout or ADB_TIMEOUT_S)

    def push(self, files: list[Path], remote_dir: str) -> None:
        checked(self._adb("shell", f"mkdir -p {shlex.quote(remote_dir)}", what="connecting (adb shell)"),
                what="connecting (adb shell)", device=self.spec.label)
        self.reached = True  # from here on there is a folder to clean up
        for f in files:
            checked(self._adb("push", str(f), f"{remote_dir}/", what="copying files to it (adb push)",
                              timeout=self.spec.timeout_s), what="copying files to it (adb push)",
                    device=self.spec.label)

    def run(self, argv: list[str], *, cwd: str, timeout: float | None = None) -> Ran:
        command = f"cd {shlex.quote(cwd)} && {' '.join(shlex.quote(a) for a in argv)}"
        return self._adb("shell", command, what=Path(argv[0]).name, timeout=timeout or self.spec.timeout_s)

    def pull(self, remote_files: list[str], local_dir: Path) -> None:
        for f in remote_files:
            checked(self._adb("pull", f, str(local_dir), what="copying results back (adb pull)",
                              timeout=self.spec.timeout_s), what="copying results back (adb pull)",
                    device=self.spec.label)

    def remove(self, remote_dir: str) -> None:
        self._adb("shell", f"rm -rf {shlex.quote(remote_dir)}", what="cleaning up")

    def describe(self) -> dict:
        """What the phone is: model, SoC, ABI, Android release, cores and CPU features; `emulator` where the
        device says it runs under QEMU (ro.kernel.qemu)."""
        checked(self._adb("get-state", what="connecting (adb get-state)"), what="connecting (adb)",
                device=self.spec.label)
        props = {}
        for key in ("ro.product.model", "ro.soc.model", "ro.product.cpu.abi", "ro.build.version.release",
                    "ro.kernel.qemu"):
            ran = self._adb("shell", "getprop", key, what="describing it (getprop)")
            props[key] = ran.stdout.strip() if ran.returncode == 0 else ""
        info = self._adb("shell", "cat /proc/cpuinfo", what="describing it (/proc/cpuinfo)").stdout
        flags = next((line.partition(":")[2].split() for line in info.splitlines()
                      if line.split(":")[0].strip() in ("Features", "flags")), [])
        from edgebundle.core.device_runner import ISA_FLAGS

        return {"cpu": props["ro.soc.model"] or props["ro.product.model"] or "unknown",
                "machine": props["ro.product.cpu.abi"] or "unknown", "model": props["ro.product.model"],
                "logical_cores": sum(1 for line in info.splitlines() if line.startswith("processor")) or None,
                "usable_cores": None, "isa": sorted(set(flags) & set(ISA_FLAGS)),
                "os": f"Android {props['ro.build.version.release']}".strip(), "python": None,
                "emulator": props["ro.kernel.qemu"] == "1"}


@dataclass(frozen=True)
class BenchmarkOutput:
    """What a runtime's benchmark binary said: per-iteration milliseconds where it prints them, else its mean
    (and its p50 where it prints one)."""

    samples_ms: tuple[float, ...]
    mean_ms: float
    runs: int
    how: str
    p50_ms: float | None = None


_ET_ITER = re.compile(r"Iteration (\d+) of (\d+): ([0-9.]+) ms")
_ET_TOTAL = re.compile(r"Model executed successfully (\d+) time\(s\) in ([0-9.]+) ms")
_ORT_AVG = re.compile(r"Average inference time cost(?: total)?:\s*([0-9.eE+-]+)\s*ms")
_ORT_RUNS = re.compile(r"Total inference requests:\s*(\d+)")
_ORT_P50 = re.compile(r"P50 Latency:\s*([0-9.eE+-]+)\s*s")
_LITERT = re.compile(r"Inference \(avg\):\s*([0-9.eE+-]+)")
_LITERT_RUNS = re.compile(r"count=(\d+)")


def parse_benchmark(text: str, binary: str) -> BenchmarkOutput:
    """Latency from the output of executor_runner, onnxruntime_perf_test or benchmark_model (by its name)."""
    name = Path(binary).name
    if "executor_runner" in name:
        iters = [float(m[3]) for m in _ET_ITER.finditer(text)]
        total = _ET_TOTAL.search(text)
        if iters:
            return BenchmarkOutput(tuple(iters), sum(iters) / len(iters), len(iters), "executor_runner's per-iteration lines")
        if total:
            n, ms = int(total[1]), float(total[2])
            return BenchmarkOutput((), ms / max(n, 1), n, "executor_runner's total over its executions (mean only)")
    elif "perf_test" in name:
        avg = _ORT_AVG.search(text)
        if avg:
            runs, p50 = _ORT_RUNS.search(text), _ORT_P50.search(text)
            return BenchmarkOutput((), float(avg[1]), int(runs[1]) if runs else 0,
                                   "onnxruntime_perf_test's average and P50", float(p50[1]) * 1000 if p50 else None)
    elif "benchmark_model" in name:
        avg = _LITERT.search(text)
        if avg:
            counts = [int(c) for c in _LITERT_RUNS.findall(text)]
            return BenchmarkOutput((), float(avg[1]) / 1000.0, counts[-1] if counts else 0,
                                   "benchmark_model's Inference (avg) (mean only)")
    else:
        raise DeviceError(f"runner {binary}: not a benchmark binary edgebundle reads (executor_runner, "
                          "onnxruntime_perf_test, benchmark_model)")
    last = [x for x in text.strip().splitlines() if x.strip()][-1:] or ["no output"]
    raise DeviceError(f"runner {name}: no latency in its output (last line: {last[0].strip()[:160]})")


def benchmark_argv(binary: str, model: str, *, runs: int, threads: int | None) -> list[str]:
    """The command line that times `model` `runs` times with the runtime's own binary."""
    name = Path(binary).name
    if "executor_runner" in name:
        return [binary, f"--model_path={model}", f"--num_executions={runs}",
                *([f"--cpu_threads={threads}"] if threads else [])]
    if "perf_test" in name:
        return [binary, "-m", "times", "-r", str(runs), *(["-x", str(threads)] if threads else []), "-I", model]
    if "benchmark_model" in name:
        return [binary, f"--graph={model}", f"--num_runs={runs}", *([f"--num_threads={threads}"] if threads else [])]
    raise DeviceError(f"runner {binary}: not a benchmark binary edgebundle reads (executor_runner, "
                      "onnxruntime_perf_test, benchmark_model)")
