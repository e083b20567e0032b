"""Real pretrained models, every target, judged by the accuracy contract: `python -m bench.real`.

Runs the recipes in examples/real/ (EfficientNet-Lite1 with ImageNet weights on real photo crops, as is and
with its structure searched; all-MiniLM-L6-v2 sentence embeddings on real English sentences, as is, pruned +
distilled from its Hugging Face folder on a text file, and with its structure searched, learning from
standard-library docstrings too) through `edgebundle.run` with every
target, keeping rejected bundles (`keep_rejected`) so their figures can be shown, then sets beside them,
in the same process, what a user does by hand (bench/hand.py: ORT quantize_static or Optimum's dynamic
config, nncf.quantize defaults) on the same exported fp32 model and calibration samples. Every candidate
is judged by one contract on the recipe's test split, which calibration and accuracy control never see,
and all are timed interleaved (ORT fp32, each runtime's own fp32, hand paths, bundles). Writes
bench/results/real.{json,md}: metric fp32 -> int8, p50 with IQR, speedup vs ORT fp32 and vs the same
runtime's fp32, share of the host's measured int8 peak, size, tool seconds and status.

Options: --only efficientnet_lite|efficientnet_lite_search|minilm|minilm_pruned|minilm_search, --targets ort-cpu,openvino
(default: every target of the recipe), --results NAME (default real: bench/results/real.{json,md}).
With --only, that model's rows replace its rows of the last results; the other model's stay.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write
from edgebundle.core.metrics import accuracy_text
from edgebundle.core.recipe import load_recipe
from edgebundle.pipeline.runner import run
from edgebundle.stages.pruning import count
from edgebundle.stages.search import start_kept

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "real"
MODELS = ("efficientnet_lite", "efficientnet_lite_search", "minilm", "minilm_pruned", "minilm_search")


def _open_bundle(path: Path, m: dict, threads: int):
    from edgebundle.targets import registry

    return registry.lookup(m["target"]["name"]).factory().open(path / m["model_file"], threads=threads,
                                                                runtime=m["target"]["runtime"])


def _own_fp32(path: Path, m: dict, fp32: Path, threads: int):
    """The bundle's runtime on the fp32 model (the same settings), where it can run one; else None."""
    from edgebundle.targets import registry

    entry = registry.lookup(m["target"]["name"])
    own = next((f for f in sorted(path.glob("model.fp32.*")) if f.name != m["model_file"]), None)  # .pte, .tflite
    src = own if own is not None else (fp32 if entry.capabilities.opens_onnx else None)
    return None if src is None else entry.factory().open(src, threads=threads, runtime=m["target"]["runtime"])


def _side_by_side(name: str, res, build_s: dict[str, float], root: Path, threads: int) -> tuple[list[dict], dict]:
    """Every CPU bundle, its runtime's fp32, ORT fp32 and the hand paths, judged by one contract on the test
    split and timed interleaved in this process. Returns the rows and the host's measured int8 peak."""
    import torch

    from bench import hand
    from bench.common import interleaved
    from edgebundle.core.data import run_outputs
    from edgebundle.core.recipe import TargetSpec
    from edgebundle.core.session import OrtSession
    from edgebundle.pipeline.evaluate import contract_for, fp32_reference, measure_feeds, original_reference

    p = res.prepared
    recipe, test = p.recipe, p.dataset.test
    fp32 = p.onnx.path("model.fp32.onnx")
    idx = recipe.judged_output[0]
    original = original_reference(p)  # pruned: everything is judged against the original model, as the tool does
    ref = fp32_reference(p)[idx] if original is None else original
    contract = contract_for(recipe, TargetSpec(name="ort-cpu"), test.labels, ref)
    feeds = measure_feeds(test, recipe, 1)
    names = p.input_names
    macs = count(p.load_student(), tuple(torch.from_numpy(feeds[n]) for n in names))[0]  # FlopCounterMode MACs
    calib = [{k: v[i:i + 1] for k, v in p.dataset.train.inputs.items()}
             for i in range(min(recipe.data.calibration_samples, len(p.dataset.train)))]
    work = work_dir(root, name)
    sessions: dict[str, Any] = {"ORT fp32": OrtSession(fp32, threads=threads)}
    rows = {"ORT fp32": {"kind": "fp32", "size_bytes": fp32.stat().st_size}}
    pruned = p.made_by("prune") is not None
    if pruned:  # the unpruned model, exported the same way: what the speedups are against
        from edgebundle.exporters.onnx import export

        teacher = work_dir(root, name) / "teacher.fp32.onnx"
        export(p.load_teacher(), recipe.inputs, recipe.outputs, recipe.stages.export, teacher)
        sessions["ORT fp32, unpruned"] = OrtSession(teacher, threads=threads)
        rows["ORT fp32, unpruned"] = {"kind": "fp32", "size_bytes": teacher.stat().st_size}
        rows["ORT fp32"]["candidate_label"] = "ORT fp32, pruned student"

    if p.made_by("search") is not None:  # the unpruned model built as the first target builds int8
        base = _unpruned_int8(p, root / f"{name}-unpruned")
        sessions["edgebundle ort-cpu, unpruned"] = base.base
        rows["edgebundle ort-cpu, unpruned"] = {"kind": "hand", "tool_s": None, "size_bytes": None}

    def hand_row(label: str, make, open_, size_of=None) -> None:
        t0 = time.perf_counter()
        art = make()
        rows[label] = {"kind": "hand", "tool_s": time.perf_counter() - t0,
                       "size_bytes": size_of(art) if size_of else None}
        sessions[label] = open_(art)

    ort_open = lambda a: OrtSession(a, threads=threads)  # noqa: E731
    size = lambda a: a.stat().st_size  # noqa: E731
    if test.inputs[names[0]].dtype.kind == "f":  # images: static Q/DQ is what users do
        hand_row("ORT int8 by hand: quantize_static QDQ u8/s8 per-channel min/max",
                 lambda: hand.ort_static(fp32, work / "static.onnx", calib), ort_open, size)
    else:  # token ids: Optimum's dynamic config, per-tensor (its default) and per-channel
        hand_row("ORT int8 by hand: Optimum avx512_vnni dynamic (per-tensor)",
                 lambda: hand.ort_dynamic_optimum_vnni(fp32, work / "dyn.onnx"), ort_open, size)
        hand_row("ORT int8 by hand: Optimum avx512_vnni dynamic, per-channel",
                 lambda: hand.ort_dynamic_optimum_vnni(fp32, work / "dyn_pc.onnx", per_channel=True), ort_open, size)
    hand_row("OpenVINO int8 by hand: nncf.quantize defaults", lambda: hand.nncf_defaults(fp32, calib),
             lambda m: hand.OvSession(m, threads))
    for b in res.bundles:
        m = b.manifest
        if m is None or b.path is None:
            continue
        label = f"edgebundle {b.target}"
        rows[label] = {"kind": "bundle", "target": b.target, "status": b.status, "manifest": m,
                       "tool_s": build_s.get(b.target), "size_bytes": m["size"]["raw_bytes"]}
        if b.status == "pending":  # no engine here: accuracy from the manifest, no time
            continue
        sessions[label] = _open_bundle(b.path, m, threads)
        if b.target != "ort-cpu":  # ort-cpu's own fp32 is ORT fp32
            own = _own_fp32(b.path, m, fp32, threads)
            if own is not None:
                sessions[f"{b.target} fp32"] = own
                rows[f"{b.target} fp32"] = {"kind": "fp32"}
    for label, r in rows.items():  # one contract judges everything not judged at build time
        if r["kind"] == "hand":
            out = run_outputs(sessions[label], test, recipe.inputs)[idx]
            v = contract.judge(ref, out, test.labels)
            r.update(metric=v.metric, fp32=v.reference, value=v.value, judged_samples=v.samples,
                     details=v.details, within_budget=v.within)
        elif r["kind"] == "bundle":
            acc = r["manifest"]["accuracy"]
            r.update(metric=acc["metric"], fp32=acc["fp32_onnx"], value=acc["target"],
                     judged_samples=acc.get("judged_samples"), details=acc.get("details"),
                     within_budget=acc["within_budget"], precision=r["manifest"]["target"]["precision"])
    timing = interleaved({k: (lambda s=s: s.run(feeds)) for k, s in sessions.items()}, threads=threads)
    for s in sessions.values():
        s.close()
    ort32 = timing["ORT fp32, unpruned" if pruned else "ORT fp32"]["p50_ms"]
    out = []
    for label, r in rows.items():
        t = timing.get(label)
        own_label = "ORT fp32" if r.get("target") == "ort-cpu" else f"{r.get('target')} fp32"
        own = timing.get(own_label) if r["kind"] == "bundle" else None
        if r["kind"] == "hand" and "OpenVINO" in label:
            own = None
        row = {k: v for k, v in r.items() if k not in ("manifest", "candidate_label")}
        if r["kind"] == "bundle":
            row["student_vs_teacher"] = r["manifest"]["accuracy"].get("student_vs_teacher")
            chain = r["manifest"]["accuracy"].get("chain") or []
            # the gate: the student on data.unlabelled's held-out share
            row["held_out_vs_original"] = next((c["held_out_vs_original"] for c in chain
                                                if "held_out_vs_original" in c), None)
        row.update(model=name, candidate=r.get("candidate_label", label), macs=macs, timing=t,
                   p50_ms=None if t is None else t["p50_ms"],
                   vs_ort_fp32=None if t is None else ort32 / t["p50_ms"],
                   vs_own_fp32=None if (t is None or own is None) else own["p50_ms"] / t["p50_ms"])
        out.append(row)
    return out


def _unpruned_int8(p, folder: Path):
    """The original model built as the recipe's first target builds its int8 artifact (the structure search's
    baseline), through the search's own pricer: `.base` is its open session."""
    import torch

    from edgebundle.core.modelio import example_inputs
    from edgebundle.pipeline.pricing import TargetPricer
    from edgebundle.stages.base import StageContext

    folder.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(p.recipe, p.dataset, example_inputs(p.recipe.inputs), torch.device("cpu"), "",
                       artifacts={"teacher": p.teacher}, work=folder)
    return TargetPricer(ctx, p.load_teacher())


def _search_rows(name: str, res) -> list[dict]:
    """The structure search's table, as the manifest records it (judged on the validation split against the
    original, timed interleaved against the unpruned int8 model; with data.unlabelled, each candidate's fp32
    student on its held-out share too). The kept student there is in the bundle rows (held_out_vs_original)."""
    b = next((b for b in res.bundles if b.manifest and b.manifest.get("search")), None)
    if b is None:
        return []
    search = b.manifest["search"]
    return [{"model": name, "kind": "search", "target": search["target"], "chosen": r["candidate"] == search["chosen"],
             **{k: r.get(k) for k in ("label", "macs_ratio", "params", "speedup", "speedup_ci95", "value", "within",
                                      "line", "summary",
                                      "status", "seconds", "why", "distill_best_epoch", "start_held",
                                      "held_out_summary", "held_out_over")}} for r in search["rows"]]


def work_dir(root: Path, name: str) -> Path:
    d = root / f"{name}-hand"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _summary(rows: list[dict], peak: float) -> str:
    """The README's table: one line per model and candidate."""
    lines = ["| model | candidate | accuracy: fp32 → int8 | p50 ms (IQR) | vs ORT fp32 | vs own fp32 | "
             "share of int8 peak | MiB | tool s | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] in ("reason", "search"):
            continue
        if r["kind"] == "failed":
            why = (r["reason"] or "").split(": ", 1)[-1][:90]
            earlier = " (earlier run)" if r.get("earlier_run") else ""
            lines.append(f"| {r['model']} | edgebundle {r['target']}{earlier} | — | — | — | — | — | — | — | failed: {why} |")
            continue
        if r["kind"] == "fp32" and not r["candidate"].startswith("ORT fp32"):
            continue
        acc = "—" if "metric" not in r else accuracy_text(r["metric"], r["fp32"], r["value"],
                                                           r["judged_samples"], r["details"])
        if r.get("metric") == "agreement":
            acc += f" (all inputs {(r['details'] or {}).get('agreement_all', 0):.1f} %)"
        svt = r.get("student_vs_teacher")
        if svt:
            acc += f"; pruned student vs unpruned: cosine min {svt['cosine_min']:.3f}, mean {svt['cosine_mean']:.3f}"
            if svt.get("held_out"):
                h = svt["held_out"]
                acc += (f"; on {h['inputs']} held-out inputs ({h.get('groups', '?')} groups) of data.unlabelled: "
                        f"cosine min {h['cosine_min']:.3f}, mean {h['cosine_mean']:.3f}"
                        + (f", top-1 agreement {h['top1_agreement']:.1f} %" if "top1_agreement" in h else ""))
        gate = r.get("held_out_vs_original")
        if gate and r.get("metric") == "agreement":
            acc += (f"; the gate there: agreement {gate['value']:.2f} % of {gate['samples']} confident inputs "
                    f"({'within' if gate['within_budget'] else 'over'} budget)")
        t = r.get("timing")
        p50 = "—" if t is None else f"{t['p50_ms']:.2f} ({t['iqr_ms'][0]:.2f}–{t['iqr_ms'][1]:.2f})"
        x = lambda v: "—" if v is None else f"{v:.2f}x"  # noqa: E731
        row_peak = (r.get("measured") or {}).get("int8_peak", peak)  # the peak of the host that timed the row
        share = "—" if t is None else f"{r['macs'] / row_peak * 1e3 / t['p50_ms']:.0%}"
        size = "—" if r.get("size_bytes") is None else f"{r['size_bytes'] / 2**20:.1f}"
        tool = "—" if r.get("tool_s") is None else f"{r['tool_s']:.0f}"
        if r["kind"] == "bundle":
            status = {"rejected": "**rejected**", "pending": "pending (no GPU: accuracy via ORT CPU)"}.get(
                r["status"], r["status"])
        else:
            status = "" if r["kind"] == "fp32" else ("within budget" if r["within_budget"] else "over budget")
        earlier = " (earlier run)" if r.get("earlier_run") else ""
        lines.append(f"| {r['model']} | {r['candidate']}{earlier} | {acc} | {p50} | {x(r['vs_ort_fp32'])} | "
                     f"{x(r['vs_own_fp32'])} | {share} | {size} | {tool} | {status} |")
    return "\n".join(lines) + "\n"


def _search_table(rows: list[dict]) -> str:
    """Each structure search's candidates: the table of the manifest's `search`."""
    found = [r for r in rows if r["kind"] == "search"]
    if not found:
        return ""
    lines = ["| model | candidate | MACs vs original | speed-up vs unpruned int8 [95% CI] | validation vs original | "
             "status | s |", "|---|---|---|---|---|---|---|"]
    for r in found:
        speed = "—" if r.get("speedup") is None else (f"{r['speedup']:.2f}x [{r['speedup_ci95'][0]:.2f}, "
                                                      f"{r['speedup_ci95'][1]:.2f}]")
        macs = "—" if r.get("macs_ratio") is None else f"{r['macs_ratio']:.2f}"
        held = f"; {r['held_out_summary']}" if r.get("held_out_summary") and not r.get("held_out_over") else ""
        lines.append(f"| {r['model']} | {r['label']}{' **(kept)**' if r['chosen'] else ''} | {macs} | {speed} | "
                     f"{r.get('summary') or r.get('line') or r.get('why') or ''}"
                     f"{start_kept(r, '; {}')}"
                     f"{held}"
                     f" | {r['status']} | "
                     f"{r.get('seconds') or '—'} |")
    return ("\nStructure searches (prune ratio auto; each candidate pruned from the original (distilled briefly where "
            "it missed the budget so), built as the first target builds int8, judged on the validation split against "
            "the original, timed interleaved against the unpruned int8 model; the unpruned row's speed-up against "
            "itself is the timing's noise):\n\n"
            + "\n".join(lines) + "\n")


def _measured_on(rows: list[dict]) -> str:
    """Which host and day measured each model's rows (a run with --only keeps the other models' rows)."""
    seen: dict[str, str] = {}
    for r in rows:
        m = r.get("measured")
        if m and r["model"] not in seen:
            seen[r["model"]] = f"{m['host']}, {m['date']}, int8 peak {m['int8_peak'] / 1e9:.0f} G MAC/s"
    return "".join(f"- {model}: {where}\n" for model, where in seen.items())


def _stamp(rows: list[dict], peak: float) -> list[dict]:
    """This run's rows, each with the host, day and int8 peak that measured it."""
    import datetime as dt

    from edgebundle.core.host import fingerprint

    h = fingerprint()
    vnni = "AVX-512 VNNI" if "avx512_vnni" in h["isa"] else "AVX2" if "avx2" in h["isa"] else "no AVX2"
    amx = " + AMX" if "amx_int8" in h["isa"] else ""
    where = {"host": f"{h['cpu']} ({vnni}{amx}, {h['usable_cores']} cores)", "date": dt.date.today().isoformat(),
             "int8_peak": peak}
    return [{**r, "measured": where} for r in rows]


def _markdown(rows: list[dict], seconds: dict[str, float], peak: float, peak_how: str) -> str:
    reasons = [f"- {r['model']} {r['target']}: {r['reason']}" for r in rows if r["kind"] in ("reason", "failed")]
    return ("Rows measured on (each model's rows come from one run; int8 figures are that ISA's):\n\n"
            + _measured_on(rows) + "\n"
            f"Measured int8 peak of the latest run's host: {peak / 1e9:.0f} G MAC/s ({peak_how}); a row's share is "
            "the time its MACs take at its own host's peak over its p50. Every candidate of a model is judged by the same "
            "contract on the recipe's test split (never seen by calibration or accuracy control) and timed "
            "interleaved in one process (2 threads, batch 1); vs ORT fp32 and vs own fp32 are ratios of those "
            "p50s (for a pruned model, vs ORT fp32 is against the unpruned model, and every row is judged against "
            "the original model's outputs, the tool's end-to-end budget; the student's distance from the unpruned "
            "model is beside it). "
            "Tool s: the target's build (quantization, accuracy control, measuring) or the hand path's "
            "calls.\n\n" + _summary(rows, peak) + _search_table(rows) + ("\nWhy each bundle was rejected or failed:\n\n" +
                                                     "\n".join(reasons) + "\n" if reasons else "")
            + "\nWall time per model: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + ".\n")


def main(argv: list[str] | None = None) -> None:
    from bench.common import int8_peak

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=MODELS, action="append")
    ap.add_argument("--targets", help="comma-separated targets (default: every target of the recipe)")
    ap.add_argument("--out", type=Path, help="output folder for the bundles (default: a temporary folder)")
    ap.add_argument("--results", default="real", help="name of the results in bench/results (default real; "
                    "e.g. real-avx2 keeps another host's rows apart)")
    args = ap.parse_args(argv)
    threads = 2
    rows, seconds = [], {}
    peak, peak_how = int8_peak(threads)
    with tempfile.TemporaryDirectory() as td:
        root = args.out or Path(td)
        for name in args.only or MODELS:
            if name in ("minilm_pruned", "minilm_search"):  # its Hugging Face folder and texts, next to the recipe
                import sys

                sys.path.insert(0, str(EXAMPLES))
                __import__("minilm").export_folder(EXAMPLES)
            if name == "efficientnet_lite_search" and not (EXAMPLES / "photo-corpus" / "other").is_dir():
                from bench.corpus import build  # its data: crops of these photos beside the example's 8

                build(EXAMPLES / "photo-corpus")
            recipe = load_recipe(EXAMPLES / f"{name}.yaml")
            t0 = time.perf_counter()
            started: dict[str, float] = {}
            build_s: dict[str, float] = {}

            def on_event(kind: str, stage: str, **_k) -> None:
                if stage.startswith("build:"):
                    if kind == "start":
                        started[stage[6:]] = time.perf_counter()
                    elif kind == "done" and stage[6:] in started:
                        build_s[stage[6:]] = time.perf_counter() - started[stage[6:]]

            res = run(recipe, output=root / name, targets=args.targets.split(",") if args.targets else None,
                      keep_rejected=True, on_event=on_event)
            rows += _side_by_side(name, res, build_s, root, threads)
            rows += _search_rows(name, res)
            rows += [{"model": name, "target": b.target, "kind": "failed", "status": b.status, "reason": b.reason}
                     for b in res.bundles if b.manifest is None]
            rows += [{"model": name, "target": b.target, "kind": "reason", "reason": b.reason}
                     for b in res.bundles if b.manifest is not None and b.status == "rejected"]
            seconds[name] = time.perf_counter() - t0
    rows = _stamp(rows, peak)
    if args.only:
        rows, seconds = _merged(rows, seconds, set(args.only), set(args.targets.split(",")) if args.targets else None,
                                args.results)
    write(args.results, {"int8_peak_macs_per_s": peak, "int8_peak_how": peak_how, "rows": rows, "seconds": seconds},
          _markdown(rows, seconds, peak, peak_how))
    _search_plots(rows, args.results)


def _search_plots(rows: list[dict], results: str) -> None:
    """Each structure search's speed-versus-fidelity plot, as the report draws it, beside the results
    (bench/results/<results>-<model>.png); rows of an earlier run without values are left alone."""
    import base64

    from bench.common import RESULTS
    from edgebundle.pipeline.report import _speed_fidelity, search_points

    for model in dict.fromkeys(r["model"] for r in rows if r["kind"] == "search"):
        pts = search_points([{k: v for k, v in r.items() if v is not None}
                             for r in rows if r["kind"] == "search" and r["model"] == model])
        if any(p[2] is not None for p in pts):
            png = _speed_fidelity(pts, title=f"{model}: structure search (x: over budget, hollow: not timed)")
            (RESULTS / f"{results}-{model}.png").write_bytes(base64.b64decode(png))


def _merged(rows: list[dict], seconds: dict[str, float], models: set[str],
            targets: set[str] | None = None, name: str = "real") -> tuple[list[dict], dict[str, float]]:
    """This run's models in place of the same models' rows of the last results; with `targets`, the last
    results' rows of the model's other targets stay, marked as measured in an earlier run."""
    import json

    from bench.common import RESULTS

    last = RESULTS / f"{name}.json"
    if not last.is_file():
        return rows, seconds
    old = json.loads(last.read_text())
    if "int8_peak_macs_per_s" not in old:  # results of the older layout: nothing to keep
        return rows, seconds
    before = {"host": f"{old['host']['cpu']} ({'AVX-512 VNNI' if 'avx512_vnni' in old['host']['isa'] else 'AVX2'}, "
                      f"{old['host']['usable_cores']} cores)", "date": old["date"], "int8_peak": old["int8_peak_macs_per_s"]}
    old["rows"] = [r if "measured" in r else {**r, "measured": before} for r in old["rows"]]
    kept = [r for r in old["rows"] if r["model"] not in models]
    if targets is not None:
        kept += [{**r, "earlier_run": True} for r in old["rows"] if r["model"] in models
                 and r["kind"] in ("bundle", "failed", "reason") and r.get("target") not in targets]
    order = {m: i for i, m in enumerate(MODELS)}
    merged = sorted(kept + rows, key=lambda r: (order.get(r["model"], len(order)), bool(r.get("earlier_run"))))
    return merged, {**old.get("seconds", {}), **seconds}


if __name__ == "__main__":
    main()
