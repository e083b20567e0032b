"""The device runner: one self-contained file that measures a bundle on the machine that will run it.

It is copied to the device (over SSH, or into a folder on this machine) and run there with the device's own
Python: `python3 device_runner.py job.json`. It needs only numpy and the bundle's runtime (onnxruntime,
openvino, executorch or ai_edge_litert), never edgebundle. It opens the artifact with the session settings the bundle was
built with, warms it up until two windows agree, times the iterations, runs every batch of `inputs.npz`
(the test split, in order) and writes `result.json` (the device's fingerprint, the raw timings) and
`outputs.npz` beside the job. The host summarizes the timings and judges the outputs against its contract.

edgebundle's own measurement (core.measure) and host fingerprint (core.host) use the loops and the
/proc/cpuinfo reader defined here, so host and device follow one protocol.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

ISA_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp",
    "sve", "i8mm",
)
WARMUP_WINDOW = 10
STABLE_WITHIN = 0.05
RUNTIMES = ("onnxruntime", "openvino", "executorch", "ai_edge_litert")


def cpuinfo():
    """(CPU model, frozenset of CPU flags) from /proc/cpuinfo (x86 `flags`, ARM `Features`)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return model, frozenset(flags)


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def hardware():
    """The part of a fingerprint that names the hardware (what its id is hashed from)."""
    model, flags = cpuinfo()
    return {"cpu": model, "machine": platform.machine(), "logical_cores": os.cpu_count(),
            "usable_cores": usable_cores(), "isa": sorted(flags & set(ISA_FLAGS))}


def _now_ms():
    return time.perf_counter_ns() / 1e6


def time_block(fn, n):
    """Milliseconds of `n` back-to-back calls (a list)."""
    out = []
    for _ in range(n):
        t0 = _now_ms()
        fn()
        out.append(_now_ms() - t0)
    return out


def _median(xs):
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def warm_up(fn, warmup_min, warmup_max):
    """Run until two consecutive windows' medians agree within 5 %; returns (iterations, stable)."""
    done, prev = 0, None
    while done < warmup_max:
        med = _median(time_block(fn, WARMUP_WINDOW))
        done += WARMUP_WINDOW
        if done >= warmup_min and prev is not None and abs(med / prev - 1) <= STABLE_WITHIN:
            return done, True
        prev = med
    return done, False


def timed(fn, iterations, time_budget_s=None):
    """The timed iterations after warm-up (stopping early past `time_budget_s`, after at least 10)."""
    samples, start = [], time.perf_counter()
    for _ in range(iterations):
        samples.extend(time_block(fn, 1))
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s and len(samples) >= 10:
            break
    return samples


def ort_session(path, threads, level="all"):
    """An ONNX Runtime CPU session with the settings every figure of the tool is measured with (the host's
    OrtSession opens through it too): `threads` intra-op threads, one inter-op, sequential, `level` graph
    optimisation."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[level]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _open_onnxruntime(path, threads, settings):
    import onnxruntime as ort

    sess = ort_session(path, threads, settings.get("graph_optimization", "all"))
    return lambda feeds: sess.run(None, feeds), ort.__version__


def ov_config(device, threads, hint="latency", precision="f32", dynamic_group=None):
    """The OpenVINO compile settings a bundle is measured with (the host's OvSession uses them too): the
    latency or throughput hint; on a CPU, the thread count, the inference precision and the dynamic
    quantization group size the bundle was judged with."""
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {hints.performance_mode: hints.PerformanceMode.LATENCY if hint == "latency"
              else hints.PerformanceMode.THROUGHPUT}
    if device.startswith("CPU"):
        config[props.inference_num_threads] = threads
        config[hints.inference_precision] = precision  # f32 unless bf16 was asked for (a measured choice)
        if dynamic_group is not None:  # the group size the bundle was judged with (int8 weights only)
            config[hints.dynamic_quantization_group_size] = int(dynamic_group)
    return config


def _open_openvino(path, threads, settings):
    import openvino as ov

    device = settings.get("device", "CPU")
    config = ov_config(device, threads, settings.get("performance_hint", "latency"),
                       settings.get("inference_precision_hint", "f32"), settings.get("dynamic_quantization_group_size"))
    compiled = ov.Core().compile_model(path, device, config)
    request = compiled.create_infer_request()

    def run(feeds):
        res = request.infer(feeds)
        return [res[o] for o in compiled.outputs]
    return run, ov.__version__ if hasattr(ov, "__version__") else ov.get_version()


def _open_executorch(path, threads, settings):
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    names = settings.get("inputs") or []

    def run(feeds):
        keys = names or list(feeds)
        rows = []
        for i in range(len(feeds[keys[0]])):  # a batch-1 program
            res = method.execute([torch.from_numpy(np.ascontiguousarray(feeds[k][i:i + 1])) for k in keys])
            rows.append([r.numpy() if hasattr(r, "numpy") else np.asarray(r) for r in res])
        return [np.concatenate([r[j] for r in rows]) for j in range(len(rows[0]))]
    from importlib import metadata

    return run, metadata.version("executorch")


X86_FLAGS = frozenset({"sse4_2", "avx", "avx2"})


def emulated(hw):
    """Whether this Python runs under a user-mode emulator: an ARM interpreter that reads an x86 host's
    /proc/cpuinfo (qemu-user passes the host's through), or a CPU model that names QEMU."""
    arm = hw["machine"] in ("aarch64", "arm64", "armv7l", "armv8l")
    return bool((arm and X86_FLAGS & set(cpuinfo()[1])) or "qemu" in str(hw["cpu"]).lower())


class LitertRunner:
    """A LiteRT interpreter fed batch 1: a larger batch one sample at a time, int8 inputs quantized and int8
    outputs dequantized with the model's own scales (the litert target's session runs through it too)."""

    def __init__(self, interp, input_names=()):
        import re

        def position(d):  # 'serving_default_args_1:0' -> 1: forward's argument order
            m = re.search(r"args_(\d+)", d["name"])
            return (int(m.group(1)) if m else 0, d["name"])

        self.interp = interp
        self.inputs = sorted(interp.get_input_details(), key=position)
        self.outputs = interp.get_output_details()
        self.input_names = list(input_names) or [d["name"] for d in self.inputs]

    def _one(self, row):
        import numpy as np

        for d, x in zip(self.inputs, row):
            scale, zero = d["quantization"]
            if d["dtype"] == np.int8 and scale:
                x = np.clip(np.round(x / scale + zero), -128, 127)
            self.interp.set_tensor(d["index"], np.ascontiguousarray(x.astype(d["dtype"])))
        self.interp.invoke()
        outs = []
        for d in self.outputs:
            y = self.interp.get_tensor(d["index"])
            scale, zero = d["quantization"]
            outs.append((y.astype(np.float32) - zero) * scale if d["dtype"] == np.int8 and scale else y.copy())
        return outs

    def __call__(self, feeds):
        import numpy as np

        names = self.input_names if all(n in feeds for n in self.input_names) else list(feeds)
        rows = [self._one([feeds[k][i:i + 1] for k in names]) for i in range(len(feeds[names[0]]))]
        return [np.concatenate([r[j] for r in rows]) for j in range(len(rows[0]))]


def _open_litert(path, threads, settings):
    from importlib import metadata

    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path, num_threads=threads)
    interp.allocate_tensors()
    return LitertRunner(interp, settings.get("inputs") or []), metadata.version("ai-edge-litert")


def describe(runtime, version):
    hw = hardware()
    return {**hw, "os": "%s %s" % (platform.system(), platform.release()), "python": platform.python_version(),
            "hostname": platform.node(), "runtime": {runtime: version}, "emulator": emulated(hw)}


def _batches(inputs, names):
    """The test batches of inputs.npz (keys 'b<i>/<name>'), in order, and the measure feed ('measure/<name>')."""
    batches = {}
    for key in inputs.files:
        group, _, name = key.partition("/")
        batches.setdefault(group, {})[name] = inputs[key]
    measure = batches.pop("measure")
    order = sorted(batches, key=lambda g: int(g[1:]))
    return [batches[g] for g in order], measure


def run_job(job_path):
    """Run one job file; returns the result dict (also written to result.json beside it)."""
    import numpy as np

    folder = os.path.dirname(os.path.abspath(job_path))
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    runtime = job["runtime"]
    if runtime not in RUNTIMES:
        raise ValueError("this runner cannot run %r artifacts (it runs %s)" % (runtime, ", ".join(RUNTIMES)))
    opener = {"onnxruntime": _open_onnxruntime, "openvino": _open_openvino, "executorch": _open_executorch,
              "ai_edge_litert": _open_litert}[runtime]
    threads = int(job.get("threads") or usable_cores())  # none given: every core this device lets us use
    run, version = opener(os.path.join(folder, job["model_file"]), threads, job.get("settings") or {})
    with np.load(os.path.join(folder, "inputs.npz")) as inputs:
        batches, feed = _batches(inputs, job.get("input_names") or [])
    m = job["measure"]
    warm, stable = warm_up(lambda: run(feed), int(m["warmup_min"]), int(m["warmup_max"]))
    samples = timed(lambda: run(feed), int(m["iterations"]), m.get("time_budget_s"))
    outs = [run(b) for b in batches]
    if outs:
        np.savez(os.path.join(folder, "outputs.npz"),
                 **{"o%d" % j: np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))})
    result = {"device": describe(runtime, version), "samples_ms": samples, "warmup_iterations": warm,
              "warmup_stable": stable, "threads": threads, "batches": len(batches),
              "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(folder, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--describe"]:  # what the device is, without a job
        print(json.dumps(describe("python", platform.python_version())))
        return 0
    if len(argv) != 1:
        print("usage: python3 device_runner.py JOB.json", file=sys.stderr)
        return 2
    try:
        run_job(argv[0])
    except ImportError as e:
        print("device runner: a module it needs is missing on this device: %s (it needs numpy and the bundle's "
              "runtime; the device's python setting names the interpreter)" % e, file=sys.stderr)
        return 3
    except Exception as e:  # one line back to the host, which names the device
        print("device runner: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
