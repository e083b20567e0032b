"""Bundle writer and manifest schema.

A bundle is `OUT/<target>/` with the runtime artifact and `manifest.json`. It is filled in a temporary
sibling folder and renamed into place only when complete: a half-written bundle never sits where a
finished one is expected.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgebundle.errors import BundleError
from edgebundle.pipeline.cache import sha256_file
from edgebundle.pipeline.lock import target_lock

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_M):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TensorInfo(_M):
    name: str
    shape: list[int | str]
    dtype: str


class Accuracy(_M):
    metric: str
    split: str
    samples: int
    teacher_pytorch: float | None
    student_pytorch: float | None
    fp32_onnx: float | None
    target: float | None
    drop_vs_fp32: float | None
    max_drop: float
    within_budget: bool | None
    output_cosine_vs_fp32: float


class TargetInfo(_M):
    name: str
    precision: str
    runtime: dict[str, Any]
    capabilities: dict[str, Any]
    exercised: bool = True  # False where the runtime's build/timing did not run on this host
    status: str = "complete"


class Manifest(_M):
    schema_version: int
    edgebundle_version: str
    created: str
    recipe: dict[str, Any]
    target: TargetInfo
    model_file: str
    files: dict[str, FileEntry]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    lineage: list[dict[str, Any]]
    quantization: dict[str, Any]
    accuracy: Accuracy
    latency: dict[str, Any] | None
    reference_latency: dict[str, Any]
    speedup: dict[str, float | None]
    host: dict[str, Any]
    notes: list[str] = Field(default_factory=list)


def read_manifest(path: Path) -> Manifest:
    """Load and validate a manifest (a bundle folder or the file itself)."""
    p = path / MANIFEST if path.is_dir() else path
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read manifest {p}: {e}") from e
    v = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(v, int) and v > SCHEMA_VERSION:
        raise BundleError(f"manifest {p} has schema version {v}; this edgebundle reads up to {SCHEMA_VERSION}: upgrade")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise BundleError(f"manifest {p} is invalid at {'.'.join(map(str, err['loc']))}: {err['msg']}") from e


def check_output_folder(output: Path) -> None:
    """Fail early, with one line, when the output folder cannot hold bundles."""
    if output.exists() and not output.is_dir():
        raise BundleError(f"output {output} exists and is not a folder")
    probe = output
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BundleError(f"output folder {output} cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BundleError(f"output folder {output} is not writable")


def write_bundle(output: Path, name: str, fill: Callable[[Path], dict[str, Any]]) -> Path:
    """`fill(tmp)` writes the bundle's files and returns the manifest dict (without `files`).

    Every file's sha256 and size go into the manifest, which is validated against the schema before the
    folder is renamed to `output/name`. An existing bundle there is replaced only once the new one is whole.
    """
    check_output_folder(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot create output folder {output}: {e.strerror or e}") from e
    with target_lock(output, name):
        # holding the lock, leftovers of an interrupted writer of this bundle are safe to remove
        for stale in [*output.glob(f".{name}.tmp-*"), *output.glob(f".{name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        return _write_locked(output, name, fill)


def _write_locked(output: Path, name: str, fill: Callable[[Path], dict[str, Any]]) -> Path:
    tmp = output / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    final = output / name
    try:
        tmp.mkdir()
        manifest = fill(tmp)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        manifest = Manifest.model_validate({**manifest, "files": files})
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            f.write(manifest.model_dump_json(indent=1))
            f.flush()
            os.fsync(f.fileno())
        old = None
        if final.exists():
            old = output / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise BundleError(f"cannot write bundle {final}: {why}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_files(folder: Path) -> list[str]:
    """Names of files whose sha256 or size no longer match the manifest (missing files included)."""
    m = read_manifest(folder)
    bad = []
    for name, entry in m.files.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != entry.bytes or sha256_file(p) != entry.sha256:
            bad.append(name)
    return bad
