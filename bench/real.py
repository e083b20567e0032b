"""Real pretrained models, every target, judged by the accuracy contract: `python -m bench.real`.

Runs the recipes in examples/real/ (EfficientNet-Lite1 with ImageNet weights on real photo crops;
all-MiniLM-L6-v2 sentence embeddings on real English sentences) through `edgebundle.run` with every
target, keeping rejected bundles (`keep_rejected`) so their figures can be shown. Each bundle is judged
on the recipe's test split, which calibration and accuracy control never see. Writes
bench/results/real.{json,md}: per model and target, the metric fp32 -> bundle, p50, speed against fp32
on the same runtime, size and status (complete, pending, rejected with its reason, or failed).

Options: --only efficientnet_lite|minilm, --targets ort-cpu,openvino (default: every target of the recipe).
With either, the rows run replace the same model's and target's rows of the last results; the others stay.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import write
from edgebundle.core.metrics import accuracy_text
from edgebundle.core.recipe import load_recipe
from edgebundle.pipeline.runner import run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "real"
MODELS = ("efficientnet_lite", "minilm")


def _row(model: str, b) -> dict:
    m = b.manifest
    if m is None:
        return {"model": model, "target": b.target, "status": b.status, "reason": b.reason}
    acc, lat, sp = m["accuracy"], m["latency"], m["speedup"]
    same = next((v for k, v in m["reference_latency"].items() if k.endswith("_fp32_student") and
                 not k.startswith("pytorch")), None)
    return {
        "model": model, "target": b.target, "status": b.status, "reason": b.reason,
        "precision": m["target"]["precision"], "metric": acc["metric"], "fp32": acc["fp32_onnx"],
        "value": acc["target"], "judged_samples": acc.get("judged_samples"), "budget": acc.get("budget"),
        "details": acc.get("details"), "within_budget": acc["within_budget"],
        "p50_ms": None if lat is None else lat["p50_ms"], "same_runtime_fp32_p50_ms": None if same is None
        else same["p50_ms"], "vs_same_runtime_fp32": sp.get("vs_same_runtime_fp32"),
        "size_bytes": m["size"]["raw_bytes"] if m.get("size") else None,
        "precision_choice": m["quantization"].get("precision_choice"), "notes": m["notes"],
        "exercised": m["target"]["exercised"],
    }


def _summary(rows: list[dict]) -> str:
    """The short table (the README's): one line per model and target, the reason cut to its first clause."""
    lines = ["| model | target | accuracy: fp32 → bundle | p50 ms | vs fp32, same runtime | MiB | status |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "metric" not in r:
            why = (r["reason"] or "").split(": ", 1)[-1][:90]
            lines.append(f"| {r['model']} | {r['target']} | — | — | — | — | failed: {why} |")
            continue
        acc = accuracy_text(r["metric"], r["fp32"], r["value"], r["judged_samples"], r["details"])
        if r["metric"] == "agreement":
            acc += f" (all crops {(r['details'] or {}).get('agreement_all', 0):.1f} %)"
        p50 = "—" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}"
        vs = "—" if r["vs_same_runtime_fp32"] is None else f"{r['vs_same_runtime_fp32']:.2f}x"
        size = "—" if r["size_bytes"] is None else f"{r['size_bytes'] / 2**20:.1f}"
        status = {"rejected": "**rejected**", "pending": "pending (no GPU: accuracy via ORT CPU)"}.get(
            r["status"], r["status"])
        lines.append(f"| {r['model']} | {r['target']} | {acc} | {p50} | {vs} | {size} | {status} |")
    return "\n".join(lines) + "\n"


def _markdown(rows: list[dict], seconds: dict[str, float]) -> str:
    return _summary(rows) + "\nIn full, with each rejection's reason:\n\n" + _details(rows, seconds)


def _details(rows: list[dict], seconds: dict[str, float]) -> str:
    lines = ["| model | target | precision | accuracy: fp32 → bundle | p50 ms | vs fp32, same runtime | size MiB | "
             "status |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "metric" not in r:
            lines.append(f"| {r['model']} | {r['target']} | — | — | — | — | — | **{r['status']}**: {r['reason']} |")
            continue
        acc = accuracy_text(r["metric"], r["fp32"], r["value"], r["judged_samples"], r["details"])
        d = r["details"] or {}
        if r["metric"] == "agreement":
            acc += f"; all inputs {d.get('agreement_all', 0):.1f} %, fp32 top-1 in top-5 {d.get('fp32_top1_in_top5_all', 0):.1f} %"
        p50 = "not measured" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}"
        vs = "—" if r["vs_same_runtime_fp32"] is None else f"{r['vs_same_runtime_fp32']:.2f}x"
        status = r["status"] if r["status"] != "rejected" else f"**rejected**: {r['reason']}"
        if r["status"] == "pending":
            status += " (engine not built here: accuracy through ORT CPU)"
        size = "—" if r["size_bytes"] is None else f"{r['size_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['model']} | {r['target']} | {r['precision']} | {acc} | {p50} | {vs} | {size} | {status} |")
    lines.append("")
    lines.append("Judged on each recipe's test split (never seen by calibration or accuracy control). "
                 "Wall time per model: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=MODELS, action="append")
    ap.add_argument("--targets", help="comma-separated targets (default: every target of the recipe)")
    ap.add_argument("--out", type=Path, help="output folder for the bundles (default: a temporary folder)")
    args = ap.parse_args(argv)
    rows, seconds = [], {}
    with tempfile.TemporaryDirectory() as td:
        root = args.out or Path(td)
        for name in args.only or MODELS:
            recipe = load_recipe(EXAMPLES / f"{name}.yaml")
            t0 = time.perf_counter()
            res = run(recipe, output=root / name, targets=args.targets.split(",") if args.targets else None,
                      keep_rejected=True)
            seconds[name] = time.perf_counter() - t0
            rows += [_row(name, b) for b in res.bundles]
    if args.only or args.targets:
        rows, seconds = _merged(rows, seconds)
    write("real", {"rows": rows, "seconds": seconds}, _markdown(rows, seconds))


def _merged(rows: list[dict], seconds: dict[str, float]) -> tuple[list[dict], dict[str, float]]:
    """This run's rows in place of the same (model, target) rows of the last results."""
    import json

    from bench.common import RESULTS

    last = RESULTS / "real.json"
    if not last.is_file():
        return rows, seconds
    old = json.loads(last.read_text())
    new = {(r["model"], r["target"]): r for r in rows}
    merged = [new.pop((r["model"], r["target"]), r) for r in old["rows"]] + list(new.values())
    return merged, {**old.get("seconds", {}), **seconds}


if __name__ == "__main__":
    main()
