"""Frozen artifact records and the content-addressed stage cache.

An artifact's key = sha256(stage name, stage config, parents' file hashes, tool versions, extra input
fingerprint). A stage whose key already has a finished folder does no work; a stage's folder is written
under a temporary name and renamed into place, so an interrupted stage never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgebundle.errors import BundleError
from edgebundle.pipeline.host import tool_versions

ARTIFACT_FILE = "artifact.json"


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    folder: Path
    files: dict[str, str]  # file name -> sha256
    parents: tuple[str, ...]  # parent artifact keys
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def path(self, name: str) -> Path:
        return self.folder / name

    def record(self) -> dict[str, Any]:
        """Lineage entry: which stage made which files from what, with which parameters."""
        return {"stage": self.stage, "key": self.key, "parents": list(self.parents), "config": self.config,
                "files": self.files, "metrics": self.metrics, "seconds": round(self.seconds, 3)}

    @classmethod
    def load(cls, folder: Path) -> Artifact:
        d = json.loads((folder / ARTIFACT_FILE).read_text())
        return cls(stage=d["stage"], key=d["key"], folder=folder, files=d["files"], parents=tuple(d["parents"]),
                   config=d["config"], metrics=d["metrics"], seconds=d.get("seconds", 0.0))


class StageCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def key(self, stage: str, config: dict[str, Any], parents: list[Artifact], extra: str = "") -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"stage": stage, "config": config, "tools": tool_versions(),
                             "parents": [p.files for p in parents], "extra": extra},
                            sort_keys=True, default=str).encode())
        return h.hexdigest()

    def folder(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key[:16]}"

    def get(self, stage: str, key: str) -> Artifact | None:
        f = self.folder(stage, key)
        if not (f / ARTIFACT_FILE).is_file():
            return None
        art = Artifact.load(f)
        if art.key != key or any(not (f / n).is_file() for n in art.files):
            return None
        return art

    def put(self, stage: str, key: str, config: dict[str, Any], parents: list[Artifact],
            fill: Callable[[Path], dict[str, Any]]) -> Artifact:
        """Run `fill(tmp_folder) -> metrics`, hash what it wrote, and rename the folder into place."""
        final = self.folder(stage, key)
        tmp = self.root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise BundleError(f"cannot create work folder {self.root}: {e.strerror or e}") from e
        try:
            t0 = time.perf_counter()
            metrics = fill(tmp)
            seconds = time.perf_counter() - t0
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            art = Artifact(stage, key, final, files, tuple(p.key for p in parents), config, metrics, seconds)
            rec = art.record()
            (tmp / ARTIFACT_FILE).write_text(json.dumps({k: v for k, v in rec.items()}, indent=1, default=str))
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / ARTIFACT_FILE).is_file():
                    raise
                # another process finished the same stage first: same key, same content
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Artifact.load(final)
