"""`edgebundle measure BUNDLE --device ...`: an existing bundle measured again on a device, judged there when the
work folder it was built from is at hand, and the measurement added to its manifest as a record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebundle.core.errors import BundleError, IntegrityError
from edgebundle.core.recipe import DeviceSpec, Recipe, TargetSpec
from edgebundle.pipeline.bundle import add_records, read_manifest, verify_files
from edgebundle.targets.base import Built


@dataclass(frozen=True)
class Measured:
    bundle: Path
    record: dict[str, Any]
    rejection: str | None = None  # over budget on the device: the line (the bundle moved to <target>.rejected)

    @property
    def within(self) -> bool | None:
        acc = self.record.get("accuracy")
        return None if acc is None else bool(acc["within_budget"])


def measure_bundle(bundle: Path, device: DeviceSpec, *, work: Path | None = None) -> Measured:
    """Measure `bundle` on `device`; with `work` (the work folder it was built from) its test split runs there
    too and is judged by the bundle's contract. The record is added to the manifest (the bundle still verifies)."""
    from edgebundle.pipeline.check import _feeds
    from edgebundle.pipeline.ondevice import Artifact, record, rejection, run_on_device

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"not a bundle folder: {bundle}")
    bad = verify_files(bundle)
    if bad:
        raise IntegrityError(f"bundle {bundle} changed since it was written: {', '.join(bad)}", bad)
    m = read_manifest(bundle)
    built_by = next((e for e in reversed(m.lineage) if e.get("stage") == f"build:{m.target.name}"), None)
    spec = (TargetSpec.model_validate(built_by["config"]) if built_by  # the spec it was built with
            else Recipe.model_validate(m.recipe["json"]).target(m.target.name))
    built = Built(model_file=m.model_file, files=tuple(m.files), precision=m.target.precision,
                  runtime=dict(m.target.runtime))
    if work is None:
        art = Artifact(bundle, built.files, built.model_file, m.target.capabilities.get("runtime", ""),
                       built.runtime, spec.threads)
        run = run_on_device(device, art, spec.measure, _feeds(m, spec.measure.batch))
        rec = record(run, None, m.host, note="accuracy not judged on the device: give the work folder the bundle "
                                            "was built from (--work) to run its test split there")
    else:
        from edgebundle.pipeline.build import job_for
        from edgebundle.pipeline.prepare import PREPARED_FILE, load_prepared
        from edgebundle.pipeline.records import recipe_digest

        prepared = load_prepared(Path(work))
        # the digest recorded when it was prepared (a later edgebundle may dump the same recipe differently)
        recorded = json.loads((Path(work) / PREPARED_FILE).read_text()).get("recipe_sha256")
        if m.recipe.get("sha256") not in (recorded, recipe_digest(prepared.recipe)):
            raise BundleError(f"bundle {bundle} was built from another recipe than the one last prepared in {work} "
                              "(recipe sha256 differs): prepare the bundle's recipe into it again (unchanged stages "
                              "are reused), so that its test split is the one the bundle was judged on")
        rec = job_for(prepared, spec).on_device(bundle, built, device, m.host)
    acc = rec.get("accuracy")
    reject = rejection(m.target.name, rec) if acc is not None and not acc["within_budget"] else None
    where = add_records(bundle, "devices", [rec], reject=reject)
    if (where.parent / "report.html").is_file():  # the report beside it shows every device
        from edgebundle.pipeline.report import write_report

        write_report(where.parent)
    return Measured(where, rec, reject)
