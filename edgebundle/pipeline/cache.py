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
from pathlib import Path
from typing import Any, Callable

from edgebundle.core.artifact import ARTIFACT_FILE, Artifact, sha256_file  # noqa: F401  (re-exported)
from edgebundle.core.errors import BundleError
from edgebundle.core.host import tool_versions

class StageCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.notes: list[str] = []  # cache entries found corrupt and discarded (the runner reports them)

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
        try:
            art = Artifact.load(f)
        except (OSError, ValueError, KeyError, TypeError) as e:
            return self._discard(f, f"its record cannot be read ({type(e).__name__})")
        if art.key != key:
            return self._discard(f, "its record names another key")
        changed = [n for n, digest in art.files.items() if not (f / n).is_file() or sha256_file(f / n) != digest]
        if changed:
            return self._discard(f, f"{', '.join(changed)} changed since it was written")
        return art

    def _discard(self, folder: Path, why: str) -> None:
        """A cache entry whose bytes do not match its record is a miss: moved aside and removed, noted."""
        self.notes.append(f"cached {folder.name} discarded and recomputed: {why}")
        aside = self.root / f".{folder.name}.corrupt-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(folder, aside)
        except OSError:
            return None
        shutil.rmtree(aside, ignore_errors=True)
        return None

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
