"""Real bundles judged on ARM kernels: onnxruntime's aarch64 build run by an arm64 Python under qemu-aarch64
(`-cpu neoverse-n1`; the root made by .ci/arm64-python.sh), as `edgebundle measure BUNDLE --device` with that
Python as the device's interpreter and the work folder the bundle was built from: the whole test split runs on
the aarch64 kernels and is judged by the bundle's own contract. Latency under emulation is an emulator's
figure, not an ARM device's: it is recorded, never compared.

    python -m bench.arm BUNDLE:WORK [BUNDLE:WORK ...]   # writes bench/results/arm.{json,md}
    python -m bench.arm --render                        # arm.md again from arm.json

The rows in bench/results/arm.md: examples/real/efficientnet_lite_mobile.yaml prepared and built (ort-mobile),
and examples/real/minilm.yaml built for `isa: avx2` (ort-cpu, uint8 weights), each with its work folder.

Each bundle is copied first (the record goes into the copy's manifest).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write
from edgebundle.core.recipe import DeviceSpec
from edgebundle.pipeline.bundle import read_manifest
from edgebundle.pipeline.remeasure import measure_bundle

ARM64_PYTHON = Path(os.environ.get("EDGEBUNDLE_ARM64_PYTHON")
                    or Path.home() / ".cache" / "edgebundle" / "arm64" / "python.sh")


def one(bundle: Path, work: Path, scratch: Path) -> dict:
    copy = scratch / bundle.name
    shutil.copytree(bundle, copy)
    m = read_manifest(copy)
    arm = DeviceSpec(local=True, python=str(ARM64_PYTHON), workdir=str(scratch / "device"), name="arm64-qemu",
                     timeout_s=6 * 3600)
    t0 = time.perf_counter()
    done = measure_bundle(copy, arm, work=work)
    rec = done.record
    acc = rec["accuracy"]
    return {"bundle": str(bundle), "recipe": m.recipe.get("name"), "target": m.target.name,
            "precision": m.target.precision, "metric": m.accuracy.metric, "budget": m.accuracy.budget,
            "x86": {"value": m.accuracy.target, "within": m.accuracy.within_budget,
                    "isa": (m.accuracy.isa or {}).get("build_host"), "details": m.accuracy.details},
            "arm": {"value": acc["value"], "within": acc["within_budget"], "line": acc["line"],
                    "samples": acc["samples"], "details": acc.get("details"), "figure": rec["figure"], "machine": rec["fingerprint"]["machine"],
                    "runtime": rec["fingerprint"]["runtime"], "p50_ms_emulated": rec["latency"]["p50_ms"]},
            "seconds": round(time.perf_counter() - t0, 1)}


def main(pairs: list[str]) -> None:
    if not ARM64_PYTHON.is_file():
        sys.exit(f"no arm64 Python at {ARM64_PYTHON}: run .ci/arm64-python.sh as root first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="eb-arm-") as tmp:
        for i, pair in enumerate(pairs):
            bundle, _, work = pair.partition(":")
            scratch = Path(tmp) / str(i)
            scratch.mkdir()
            rows.append(one(Path(bundle), Path(work), scratch))
    write("arm", {"rows": rows}, render(rows))


def _also(details: dict | None, metric: str) -> str:
    """What the verdict's line leaves out: cosine mean, or agreement on all inputs (near-ties included)."""
    d = details or {}
    if metric == "cosine":
        return f"mean {d.get('cosine_mean', float('nan')):.5f}"
    if metric == "agreement":
        return f"all inputs {d.get('agreement_all', float('nan')):.1f} %"
    return ""


def render(rows: list[dict]) -> str:
    md = ["Bundles judged on onnxruntime's aarch64 kernels (qemu-aarch64 -cpu neoverse-n1, an emulator: its "
          "latency is no ARM figure), whole test split, by each bundle's contract; beside it the verdict on "
          "the x86 host that built it.\n",
          "| bundle | target | precision | budget | x86 (build host) | aarch64 (emulated) | judged inputs | minutes |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda v: f"min {v:.4f}") if r["metric"] == "cosine" else (lambda v: f"{v:.2f} %")
        x86, arm = r["x86"], r["arm"]
        md.append(f"| {r['recipe']} | {r['target']} | {r['precision']} | {r['budget']} | {fmt(x86['value'])}, "
                  f"{_also(x86['details'], r['metric'])} ({'within' if x86['within'] else 'over'}) | "
                  f"{fmt(arm['value'])}, {_also(arm['details'], r['metric'])} "
                  f"({'within' if arm['within'] else 'over'}) | {arm['samples']} | {r['seconds'] / 60:.1f} |")
    return "\n".join(md) + "\n"


def rerender() -> None:
    """bench/results/arm.md again from arm.json (the table's layout changed, the measurements did not)."""
    import json

    from bench.common import RESULTS

    data = json.loads((RESULTS / "arm.json").read_text())
    md = (RESULTS / "arm.md").read_text()
    (RESULTS / "arm.md").write_text(md.split("\n\n", 1)[0] + "\n\n" + render(data["rows"]))


if __name__ == "__main__":
    rerender() if sys.argv[1:] == ["--render"] else main(sys.argv[1:])
