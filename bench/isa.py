"""int8 on the deployment ISA, held out: `python -m bench.isa`.

Builds the photo-folder EfficientNet-Lite1 example (examples/real/efficientnet_lite_folder.yaml: 8 photo
folders, split by photo) with `isa: avx2` on both x86 CPU targets, so each bundle is built for an AVX2 CPU and
judged on AVX2 arithmetic (natively on an AVX2 host, under `qemu-x86_64 -cpu Haswell` on a larger one). Then
every bundle, and beside them what a user gets by hand (ORT `quantize_static` u8/s8 per-channel, NNCF
defaults), is judged on crops of 16 photos no example uses (efficientnet_lite.heldout), on the build host's
ISA and on AVX2 (emulated where the host has more): top-1 agreement with the fp32 model on the crops where it
is confident, the interval drawn by photo. On an AVX2 host every candidate, ORT fp32 and OpenVINO fp32 are
timed interleaved on it (speed against ORT fp32). On a larger host QEMU reproduces AVX2 int8 numerics exactly,
not its timing: the p50 column is the build host's, never an AVX2 figure; OpenVINO's kernels can be capped at
AVX2 (oneDNN's ONEDNN_MAX_CPU_ISA, in a child process), so its candidates and its fp32 model are timed
interleaved there, the AVX2 code on the build host's cores (not an AVX2 CPU). Writes
bench/results/isa.{json,md} (an AVX2 host's run: isa-avx2.{json,md}, so both hosts' tables stand side by side).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write
from edgebundle.core.isa import exceeds

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "real"
THREADS = 2


def _heldout(per_photo: int):
    from edgebundle.core.data import Split

    sys.path.insert(0, str(EXAMPLES))
    h = __import__("efficientnet_lite").heldout(per_photo=per_photo)
    return Split({"image": h["image"]}, None, h["group"]), h["names"]


def _verdicts(contract, ref: np.ndarray, split, native: np.ndarray, avx2: np.ndarray | None) -> dict[str, Any]:
    out = {}
    for isa, o in (("native", native), ("avx2", avx2)):
        if o is None:
            continue
        v = contract.judge(ref, o, None, interval=True, groups=split.groups)
        out[isa] = {"value": v.value, "interval": v.interval, "within": v.within, "confident": v.samples,
                    "groups": v.groups, "agreement_all": v.details["agreement_all"], "line": v.line()}
    return out


def _outputs(target: str, model: Path, runtime: dict[str, Any], split, inputs, emulate: bool) -> tuple:
    """The artifact's logits on `split`: natively, and on AVX2 arithmetic when asked (OpenVINO: oneDNN capped at
    AVX2, the outputs qemu gives; others under qemu -cpu Haswell)."""
    from edgebundle.core.data import run_outputs
    from edgebundle.core.isa import cap_env
    from edgebundle.pipeline.emulated import emulated_outputs
    from edgebundle.targets import registry

    with registry.lookup(target).factory().open(model, threads=THREADS, runtime=runtime) as s:
        native = run_outputs(s, split, inputs)[0]
    capped = registry.lookup(target).capabilities.isa_cap == "onednn"
    avx2 = emulated_outputs(target, model, runtime, THREADS, split, inputs, None if capped else "Haswell",
                            env=cap_env("avx2") if capped else None)[0] if emulate else None
    return native, avx2


def _interleaved_times(models: dict[str, tuple[str, Path]], feeds: dict[str, np.ndarray], capped: bool,
                       rounds: int = 15) -> dict[str, Any]:
    """Each model (label: (target, file)) timed interleaved, 20 runs of each per round, batch 1, in a child process:
    with `capped`, its oneDNN capped at AVX2 (OpenVINO models only). p50 ms per model, and the median of each
    round's ratio of medians to the first model (the baseline)."""
    import json
    import os
    import subprocess

    from edgebundle.core.isa import cap_env

    with tempfile.TemporaryDirectory() as td:
        spec = Path(td) / "spec.json"
        np.savez(Path(td) / "in.npz", **feeds)
        spec.write_text(json.dumps({"models": {k: [t, str(v)] for k, (t, v) in models.items()}, "rounds": rounds}))
        env = {**os.environ, **(cap_env("avx2") if capped else {}),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run([sys.executable, "-m", "bench.isa", "--time-child", td], check=True, env=env)
        return json.loads((Path(td) / "out.json").read_text())


def _time_child(folder: Path) -> None:
    """Rounds of 20 runs of each model in turn (bench.common.interleaved), so one model's idle runtime threads
    (ONNX Runtime's spin after a run) cost the next model at most once per round, not on every run."""
    import json

    from bench.common import interleaved
    from edgebundle.targets import registry

    spec = json.loads((folder / "spec.json").read_text())
    with np.load(folder / "in.npz") as d:
        feeds = {k: d[k] for k in d.files}
    sessions = {k: registry.lookup(t).factory().open(Path(v), threads=THREADS, runtime={})
                for k, (t, v) in spec["models"].items()}
    try:
        times = interleaved({k: (lambda s=s: s.run(feeds)) for k, s in sessions.items()},
                            rounds=spec["rounds"], per_round=20, threads=THREADS)
    finally:
        for s in sessions.values():
            s.close()
    base = np.array(next(iter(times.values()))["round_medians_ms"])
    ratios = {k: base / np.array(v["round_medians_ms"]) for k, v in times.items()}
    out = {k: {"p50_ms": v["p50_ms"], "p25_75_ms": v["iqr_ms"], "vs_first": float(np.median(ratios[k])),
               "vs_first_p25_75": [float(q) for q in np.percentile(ratios[k], [25, 75])]} for k, v in times.items()}
    (folder / "out.json").write_text(json.dumps(out))


def _bundles(recipe, out: Path, reuse: bool):
    """(prepared, bundle results): built now, or with `reuse` read from `out` (its work folder and manifests)."""
    import json

    from edgebundle.pipeline.prepare import load_prepared
    from edgebundle.pipeline.records import BundleResult
    from edgebundle.pipeline.runner import run

    if not reuse:
        res = run(recipe, output=out, keep_rejected=True)
        return res.prepared, res.bundles
    found = []
    for t in recipe.targets:
        folder = next((f for f in (out / t.name, out / f"{t.name}.rejected") if (f / "manifest.json").is_file()), None)
        m = None if folder is None else json.loads((folder / "manifest.json").read_text())
        found.append(BundleResult(t.name, folder, m, status=(m or {}).get("target", {}).get("status", "complete")
                                  if m else "failed", reason=None if m else "no bundle in the folder"))
    return load_prepared(out / ".work", recipe), found


def _hand(p, work: Path) -> list[tuple[str, str, Path, dict]]:
    """The hand paths' artifacts: (label, the target that opens it, model file, runtime)."""
    import openvino as ov

    from bench import hand

    fp32 = p.onnx.path("model.fp32.onnx")
    calib = [{"image": p.dataset.train.inputs["image"][i:i + 1]}
             for i in range(min(p.recipe.data.calibration_samples, len(p.dataset.train)))]
    ort = hand.ort_static(fp32, work / "static.onnx", calib)
    ov.save_model(hand.nncf_defaults(fp32, calib), str(work / "nncf.xml"))
    return [("ORT int8 by hand: quantize_static QDQ u8/s8 per-channel", "ort-cpu", ort, {}),
            ("OpenVINO int8 by hand: nncf.quantize defaults", "openvino", work / "nncf.xml", {})]


def main(argv: list[str] | None = None) -> None:
    from edgebundle.core.host import fingerprint
    from edgebundle.core.isa import host_isa, qemu
    from edgebundle.core.recipe import TargetSpec, load_recipe
    from edgebundle.core.session import OrtSession
    from edgebundle.core.data import run_outputs
    from edgebundle.pipeline.evaluate import contract_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="output folder (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="judge the bundles already in --out/bundles (built by "
                    "an earlier run) instead of building them again")
    ap.add_argument("--time-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--per-photo", type=int, default=12, help="held-out crops per photo (default 12: 192 crops; "
                    "OpenVINO under qemu takes about 1.5 s a crop here)")
    args = ap.parse_args(argv)
    if args.time_child:
        return _time_child(args.time_child)
    host = host_isa()
    emulate = host != "avx2"
    if emulate and qemu() is None:
        raise SystemExit("qemu-x86_64 is needed on a host with more than AVX2 (apt-get install qemu-user)")
    if not (EXAMPLES / "photos").is_dir():
        sys.path.insert(0, str(EXAMPLES))
        __import__("efficientnet_lite").export_folder(EXAMPLES)
    recipe = load_recipe(EXAMPLES / "efficientnet_lite_folder.yaml")
    recipe = recipe.model_copy(update={"targets": [t.model_copy(update={"options": {**t.options, "isa": "avx2"}})
                                                   for t in recipe.targets]})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        root = args.out or Path(td)
        p, bundles = _bundles(recipe, root / "bundles", args.reuse)
        split, names = _heldout(args.per_photo)
        with OrtSession(p.onnx.path("model.fp32.onnx"), threads=THREADS) as s:
            ref = run_outputs(s, split, recipe.inputs)[0]
        contract = contract_for(recipe, TargetSpec(name="ort-cpu"), None, ref)
        rows = []
        for b in bundles:
            if b.manifest is None:
                rows.append({"candidate": f"edgebundle {b.target}", "status": b.status, "reason": b.reason})
                continue
            m = b.manifest
            # int8 whose integers cannot differ between ISAs (the manifest says judged natively) is not emulated
            emulated = (m["accuracy"].get("isa") or {}).get("judged_on") in ("emulated", "capped")
            native, avx2 = _outputs(b.target, b.path / m["model_file"], m["target"]["runtime"], split,
                                    recipe.inputs, emulate and emulated)
            rows.append({"candidate": f"edgebundle {b.target}", "status": b.status, "reason": b.reason,
                         "precision": m["target"]["precision"], "scheme": m["quantization"].get("scheme"),
                         "test_split": {"value": m["accuracy"]["target"], "within": m["accuracy"]["within_budget"],
                                        "interval": m["accuracy"].get("interval"), "isa": m["accuracy"].get("isa")},
                         "p50_ms": m["latency"]["p50_ms"], "heldout": _verdicts(contract, ref, split, native, avx2)})
        work = root / "hand"
        work.mkdir(parents=True, exist_ok=True)
        for label, target, model, runtime in _hand(p, work):
            native, avx2 = _outputs(target, model, runtime, split, recipe.inputs, emulate)
            rows.append({"candidate": label, "status": "hand", "heldout": _verdicts(contract, ref, split, native, avx2),
                         "model": [target, str(model)]})
        timing = _timing(p, bundles, rows, host, {"image": split.inputs["image"][:1]})
    h = fingerprint()
    payload = {"host": h, "host_isa": host, "avx2_by": "qemu-x86_64 -cpu Haswell (ONNX Runtime), oneDNN capped at "
               "AVX2 (OpenVINO: the same outputs)" if emulate else "native",
               "heldout_photos": names, "heldout_crops": len(split), "rows": rows, "avx2_kernels": timing,
               "seconds": time.perf_counter() - t0}
    write("isa-avx2" if host == "avx2" else "isa", payload, _markdown(payload))


def _timing(p, bundles, rows: list[dict[str, Any]], host: str, feeds: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Interleaved timing on AVX2 code: natively on an AVX2 host (every candidate, against ORT fp32 first), or
    OpenVINO's models with oneDNN capped at AVX2 on a larger host (against OpenVINO fp32). Each row gets its
    figures under `avx2_kernels`; None where neither applies."""
    native = host == "avx2"
    if not native and not exceeds(host, "avx2"):
        return None
    fp32 = p.onnx.path("model.fp32.onnx")
    models = {"ORT fp32": ("ort-cpu", fp32)} if native else {}
    models["OpenVINO fp32"] = ("openvino", fp32)
    for b in bundles:
        if b.manifest is not None and (native or b.target == "openvino"):
            models[f"edgebundle {b.target}"] = (b.target, b.path / b.manifest["model_file"])
    for r in rows:
        if r.get("model") and (native or r["model"][0] == "openvino"):
            models[r["candidate"]] = (r["model"][0], Path(r["model"][1]))
    times = _interleaved_times(models, feeds, capped=not native)
    for r in rows:
        r["avx2_kernels"] = times.get(r["candidate"])
    return {"how": "native" if native else "capped", "baseline": next(iter(models)), "times": times}


def _markdown(payload: dict[str, Any]) -> str:
    timing = payload.get("avx2_kernels") or {}
    native = payload["host_isa"] == "avx2"
    base = timing.get("baseline", "OpenVINO fp32")
    lines = ["| candidate | shipped | test split (judged on AVX2) | held out, build host's ISA | held out, AVX2 | "
             f"p50 ms (build host) | {'AVX2 CPU' if native else 'AVX2 kernels'}: p50 ms, speed vs {base} | status |",
             "|---|---|---|---|---|---|---|---|"]
    cap = lambda k: "—" if not k else f"{k['p50_ms']:.2f}, {k['vs_first']:.2f}x" + (  # noqa: E731
        f" ({k['vs_first_p25_75'][0]:.2f}-{k['vs_first_p25_75'][1]:.2f})" if "vs_first_p25_75" in k else "")
    fmt = lambda v: "—" if v is None else (  # noqa: E731
        f"{v['value']:.1f} % [{v['interval'][0]:.1f}, {v['interval'][1]:.1f}] of {v['confident']} confident, "
        f"{v['groups']} photos (all crops {v['agreement_all']:.1f} %)")
    for r in payload["rows"]:
        held, test = r.get("heldout", {}), r.get("test_split")
        shipped = r.get("precision", "—") + (f": {r['scheme']}" if r.get("scheme") else "")
        test_text = "—" if test is None else (f"{test['value']:.2f} % on {(test['isa'] or {}).get('deployment', '?')}"
                                              f" ({(test['isa'] or {}).get('judged_on', '?')})")
        p50 = "—" if r.get("p50_ms") is None else f"{r['p50_ms']:.2f}"
        neutral = "same integers as the build host's (judged natively, as the tool does)"
        avx2 = "the build host's (an AVX2 CPU)" if native else fmt(held.get("avx2")) if (
            held.get("avx2") or r["status"] == "hand" or r.get("precision") != "int8") else neutral
        lines.append(f"| {r['candidate']} | {shipped} | {test_text} | {fmt(held.get('native'))} | "
                     f"{avx2} | {p50} | {cap(r.get('avx2_kernels'))} | {r['status']} |")
    for label in ("ORT fp32", "OpenVINO fp32"):
        if label in timing.get("times", {}):
            lines.append(f"| {label} | fp32 | — | — | — | — | {cap(timing['times'][label])} | reference |")
    how = ("every model timed interleaved (rounds of 20 runs each), batch 1, 2 threads, in one process on this AVX2 "
           f"CPU; speed is the median of per-round ratios to {base} (in brackets: their quartiles). ") if native else (
        "AVX2 kernels: OpenVINO models timed interleaved, batch 1, 2 threads, in one process whose oneDNN is capped "
        "at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2): the AVX2 code on the build host's cores, not an AVX2 CPU's; speed is "
        "the median of per-round ratios to OpenVINO fp32 under the same cap. ")
    return (f"Build host ISA: {payload['host_isa']} ({payload['host']['cpu']}); AVX2 verdicts by "
            f"{payload['avx2_by']}{'' if native else ' (exact int8 numerics, not timing)'}. Held out: "
            f"{payload['heldout_crops']} crops of "
            f"{len(payload['heldout_photos'])} photos no example uses ({', '.join(payload['heldout_photos'])}); "
            "agreement with the fp32 model on the crops where it is confident (top-1 probability >= 0.5), 95 % "
            "interval drawn by photo. Bundles: examples/real/efficientnet_lite_folder.yaml with `isa: avx2`.\n\n"
            + "\n".join(lines) + "\n\nThe p50 is the one the bundle's build recorded on the build host (a build "
            "beside other jobs records a slower one" + (")" if native else "; not an AVX2 figure)") + ". " + how
            + f"Wall time: {payload['seconds'] / 60:.1f} min.\n")


if __name__ == "__main__":
    main()
