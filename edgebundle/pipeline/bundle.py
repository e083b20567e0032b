"""Bundle writer and manifest schema.

A bundle is `OUT/<target>/` with the runtime artifact and `manifest.json`. It is filled in a temporary
sibling folder and renamed into place only when complete: a half-written bundle never sits where a
finished one is expected.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from edgebundle.core.errors import BundleError, IntegrityError
from edgebundle.core.artifact import sha256_file
from edgebundle.pipeline.lock import target_lock

SCHEMA_VERSION = 2  # 2: the accuracy contract (metric, budget, judged samples), status rejected
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` format, covering every file including the manifest


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_M):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TensorInfo(_M):
    name: str
    shape: list[int | str]
    dtype: str
    # the judged output of a classifier whose data named its classes (image class sub-folders, text labels):
    # the class of each score, in order, so a deployment reads the scores as training did
    classes: list[str] | None = None

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        import numpy as np

        try:
            np.dtype(v)
        except TypeError:
            if v != "bfloat16":
                raise ValueError(f"'{v}' is not a tensor type (float32, int64, ...)") from None
        return v

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int | str]) -> list[int | str]:
        if any(isinstance(d, int) and d < 0 for d in v):  # 0: a dimension ONNX left unnamed and unknown
            raise ValueError(f"{v} has a negative dimension (a dynamic one is a name)")
        return v

    @model_serializer(mode="wrap")
    def _only_named(self, handler):  # a tensor without class names is written as before (no "classes": null)
        d = handler(self)
        if d.get("classes") is None:
            d.pop("classes", None)
        return d


class Accuracy(_M):
    metric: str  # top1 | agreement | cosine | snr | mse | module:fn (schema 1: top1 | none)
    output: str | None = None  # the output judged
    split: str
    samples: int
    judged_samples: int | None = None  # agreement: the inputs where fp32 is confident
    budget: str | None = None  # the rule, in words
    teacher_pytorch: float | None
    student_pytorch: float | None
    fp32_onnx: float | None  # the fp32 model's value on the metric (top1: its accuracy; agreement: 100)
    target: float | None  # the bundle's value on the metric
    drop_vs_fp32: float | None
    max_drop: float | None
    within_budget: bool | None
    details: dict[str, Any] = Field(default_factory=dict)
    output_cosine_vs_fp32: float | None  # None when an output is not finite (e.g. -inf log-probabilities)
    student_vs_teacher: dict[str, Any] | None = None  # a pruned, distilled student against its teacher (test; held_out: data.unlabelled's held-out groups)
    # what the verdict (fp32_onnx, target, drop_vs_fp32, within_budget) is against: "original" (the model the
    # user brought, end to end) or "student" (the fp32 student); None in manifests written before it existed
    reference: str | None = None
    chain: list[dict[str, Any]] | None = None  # original -> student fp32 -> bundle, the metric at each step
    # x86 CPU targets: the ISA the bundle is built for, the build host's, and how the verdict was reached on it
    # (judged_on: native | capped (the runtime's kernels capped at it: kernel_cap) | emulated (qemu-x86_64) |
    # host (the deployment ISA could not be reproduced here))
    isa: dict[str, Any] | None = None
    interval: list[float] | None = None  # the verdict value's confidence interval (cosine: of the mean)
    confidence: float | None = None  # its level
    interval_within_budget: bool | None = None  # whether its worst end is within the budget
    resolve_with: int | None = None  # judged inputs that would resolve an interval reaching past the budget
    decided_by: str | None = None  # "point estimate" or "interval" (metric.confidence)
    # independent groups the verdict rests on (crops of one photo are one group; None: each input its own),
    # and the inputs and groups in each split with where the groups came from (no group is in two splits)
    groups: int | None = None
    splits: dict[str, Any] | None = None

    @property
    def against(self) -> str | None:
        """What the verdict names as its reference where a compression stage ran: 'original' or 'fp32 student'
        (None: no compression, or a manifest from before references were recorded)."""
        if not self.chain or not any(s.get("step") == "student fp32" for s in self.chain):
            return None
        return "original" if self.reference == "original" else "fp32 student"


class TargetInfo(_M):
    name: str
    precision: str
    runtime: dict[str, Any]
    capabilities: dict[str, Any]
    exercised: bool = True  # False where the runtime's build/timing did not run on this host
    status: str = "complete"  # complete | pending (built elsewhere) | rejected (missed its accuracy budget)
    rejection: str | None = None  # rejected: the one line saying what missed and what was tried


class ManifestDraft(_M):
    """Everything a manifest says but its files' hashes and sizes, which the bundle writer adds."""

    schema_version: int
    edgebundle_version: str
    created: str
    recipe: dict[str, Any]
    target: TargetInfo
    model_file: str
    inputs: list[TensorInfo] = Field(min_length=1)
    outputs: list[TensorInfo] = Field(min_length=1)
    lineage: list[dict[str, Any]]
    quantization: dict[str, Any]
    accuracy: Accuracy
    latency: dict[str, Any] | None
    reference_latency: dict[str, Any]
    speedup: dict[str, float | None]
    host: dict[str, Any]
    notes: list[str] = Field(default_factory=list)
    # measurements on devices (edgebundle measure --device, build --device): one record each, newest last
    devices: list[dict[str, Any]] | None = None
    # prune ratio auto: the structure search's table (candidate, MACs, parameters, speed-up against the unpruned
    # model on the first target, verdict on the validation split against the original, kept or refused)
    search: dict[str, Any] | None = None


class Manifest(ManifestDraft):
    files: dict[str, FileEntry]
    size: dict[str, int] | None = None  # raw and gzip -9 bytes of the artifact files (what a device downloads)


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


def replaceable_problem(folder: Path) -> str | None:
    """None when `folder` may be replaced by a new bundle: it does not exist, or it is exactly a bundle this
    tool wrote (manifest and SHA256SUMS of ours, every file as written, nothing added). Anything else holds
    someone's files, and replacing it would lose them: the reason, in words."""
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        return "it is not a folder"
    if not (folder / MANIFEST).is_file() or not (folder / SUMS).is_file():
        return "it is not an edgebundle bundle (no manifest.json and SHA256SUMS)"
    try:
        bad = verify_files(folder)
    except BundleError as e:
        return f"its manifest cannot be read ({e})"
    if bad:
        return f"it holds files the bundle did not write or that changed since: {', '.join(bad)}"
    return None


def check_bundle_places(output: Path, names: list[str]) -> None:
    """Refuse, before any work, to write where a folder that is not one of our bundles would be replaced."""
    for name in names:
        for place in (output / name, output / f"{name}.rejected"):
            why = replaceable_problem(place)
            if why:
                raise BundleError(f"refusing to replace {place}: {why}; move it away or choose another output folder")


def write_bundle(output: Path, name: str, fill: Callable[[Path], ManifestDraft | dict[str, Any]], *,
                 rejected_name: str | None = None) -> Path | None:
    """`fill(tmp)` writes the bundle's files and returns the manifest dict (without `files`).

    Every file's sha256 and size go into the manifest, which is validated against the schema before the
    folder is renamed to `output/name`. An existing bundle there is replaced only once the new one is whole.
    A manifest with status 'rejected' never goes to `output/name`: it goes to `output/rejected_name` when
    that is given, else it is discarded (returns None).
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
        return _write_locked(output, name, fill, rejected_name)


def _hash_and_gzip_size(path: Path) -> tuple[str, int, int]:
    """sha256, size and gzip -9 size of a file in one streamed read (bounded memory for large models)."""
    h, comp = hashlib.sha256(), zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    nbytes = gzbytes = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            nbytes += len(chunk)
            gzbytes += len(comp.compress(chunk))
    return h.hexdigest(), nbytes, gzbytes + len(comp.flush())


def _write_locked(output: Path, name: str, fill: Callable[[Path], ManifestDraft | dict[str, Any]],
                  rejected_name: str | None = None) -> Path | None:
    tmp = output / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    final = output / name
    try:
        tmp.mkdir()
        draft = fill(tmp)
        manifest = draft.model_dump(mode="json") if isinstance(draft, ManifestDraft) else draft
        if (manifest.get("target") or {}).get("status") == "rejected":
            if rejected_name is None:
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            final = output / rejected_name
        files, gz = {}, 0
        for p in sorted(tmp.iterdir()):
            if p.is_file() and p.name not in (MANIFEST, SUMS):
                digest, nbytes, gzbytes = _hash_and_gzip_size(p)
                files[p.name] = {"sha256": digest, "bytes": nbytes}
                gz += gzbytes
        size = {"raw_bytes": sum(f["bytes"] for f in files.values()), "gzip_bytes": gz}
        _write_manifest(tmp, Manifest.model_validate({**manifest, "files": files, "size": size}))
        why = replaceable_problem(final)
        if why:  # checked before the build started too; a folder may have appeared since
            raise BundleError(f"refusing to replace {final}: {why}; move it away or choose another output folder")
        _swap_in(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = {errno.ENOSPC: "disk full", errno.EFBIG: "file size limit reached", errno.EDQUOT: "disk quota exceeded"
               }.get(e.errno, e.strerror or str(e))
        raise BundleError(f"cannot write bundle {final}: {why}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    """manifest.json and SHA256SUMS (the files' hashes from the manifest, the manifest's own) into `folder`."""
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        f.write(manifest.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    sums = {**{n: e.sha256 for n, e in manifest.files.items()}, MANIFEST: sha256_file(folder / MANIFEST)}
    (folder / SUMS).write_text("".join(f"{h}  {n}\n" for n, h in sorted(sums.items())), encoding="utf-8")


def _swap_in(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` where `final` is expected, the old one (if any) moved aside first."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def add_records(folder: Path, key: str, records: list[dict[str, Any]], *, reject: str | None = None) -> Path:
    """Append records to a list of a written bundle's manifest (a device measurement) and rewrite it as the
    writer does: the artifact files hard-linked (or copied) into a new folder with the new manifest and
    SHA256SUMS, swapped in whole. The bundle must verify before; it verifies after. With `reject` (the line
    saying why) the bundle becomes status rejected and moves to <name>.rejected: where it was, nothing is left.
    Returns where the bundle is."""
    folder = Path(folder)
    final = folder.parent / f"{folder.name}.rejected" if reject else folder
    why = replaceable_problem(final) if reject else None
    if why:
        raise BundleError(f"cannot move the rejected bundle to {final}: {why}")
    with target_lock(folder.parent, folder.name):  # no build replaces it while it is read and rewritten
        bad = verify_files(folder)
        if bad:
            raise IntegrityError(f"bundle {folder} changed since it was written: {', '.join(bad)}; not adding to it",
                                 bad)
        data = read_manifest(folder).model_dump(mode="json")
        data[key] = [*(data.get(key) or []), *records]
        if reject:
            data["target"].update(status="rejected", rejection=reject)
        new = Manifest.model_validate(data)
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for name in new.files:
                try:
                    os.link(folder / name, tmp / name)
                except OSError:
                    shutil.copy2(folder / name, tmp / name)
            _write_manifest(tmp, new)
            _swap_in(tmp, final)
            if final != folder:
                shutil.rmtree(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _read_sums(folder: Path) -> dict[str, str]:
    p = folder / SUMS
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read {p}: {e}") from e
    sums = {}
    for line in lines:
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or "/" in name or name in ("", ".", ".."):
            raise BundleError(f"{p} is malformed at: {line[:80]!r}")
        sums[name] = digest
    return sums


def entry_problem(folder: Path, name: str) -> str | None:
    """Why a file a manifest names is not safely part of the bundle (None when it is): a plain file name in
    the bundle folder itself, no path, no link, no device or folder."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or Path(name).is_absolute() or Path(name).name != name):
        return "outside the bundle"
    p = Path(folder) / name
    if p.is_symlink():
        return "a link, not a regular file"
    if p.exists() and not p.is_file():
        return "not a regular file"
    return None


def unsafe_entries(folder: Path, m: Manifest) -> list[str]:
    """Every path the manifest names that a runtime or a check would open outside the bundle's own regular,
    listed files: 'model_file '../x' (outside the bundle)'."""
    out = []
    for where, name in [("model_file", m.model_file), *(("files", n) for n in m.files)]:
        why = entry_problem(folder, name)
        if why:
            out.append(f"{where} {name!r} ({why})")
    if not out and m.model_file not in m.files:
        out.append(f"model_file {m.model_file!r} (not among the bundle's listed files)")
    return out


def verify_files(folder: Path) -> list[str]:
    """Names of files that no longer match what was written: changed, missing or added; and, described,
    every path the manifest names outside the bundle ('model_file '../x' (outside the bundle)').

    Checked: every path the manifest names is a regular file in the bundle folder and listed; every
    file's sha256 (and size) against the manifest, the manifest's own sha256 against SHA256SUMS, and that
    the folder holds nothing else. The manifest must also pass its schema.
    """
    folder = Path(folder)
    sums = _read_sums(folder)
    bad = []
    if MANIFEST not in sums or not (folder / MANIFEST).is_file() or sha256_file(folder / MANIFEST) != sums[MANIFEST]:
        bad.append(MANIFEST)
        try:
            m = read_manifest(folder)
        except BundleError:
            return bad
    else:
        m = read_manifest(folder)
    unsafe = unsafe_entries(folder, m)
    if unsafe:  # nothing outside the bundle is read, hashed or opened
        return bad + unsafe
    for name, entry in m.files.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != entry.bytes or sha256_file(p) != entry.sha256:
            bad.append(name)
        elif sums.get(name) != entry.sha256:  # the file is as the manifest says: its SHA256SUMS line changed
            bad.append(f"{SUMS} (its line for {name})")
    known = {*m.files, MANIFEST, SUMS}
    bad += sorted(p.name for p in folder.iterdir() if p.name not in known)
    return bad


# ---- packed bundles ------------------------------------------------------------------------------------

def pack(folder: Path) -> Path:
    """`folder` -> `folder.tar.gz` beside it, reproducible (sorted, mtime 0, no owners), written atomically."""
    import tarfile

    folder = Path(folder)
    final = folder.parent / f"{folder.name}.tar.gz"
    tmp = folder.parent / f".{folder.name}.tar.gz.tmp-{uuid.uuid4().hex[:8]}"

    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        ti.mode = 0o755 if ti.isdir() else 0o644
        return ti

    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(folder, arcname=folder.name, recursive=False, filter=clean)
            for p in sorted(folder.iterdir()):
                tar.add(p, arcname=f"{folder.name}/{p.name}", recursive=False, filter=clean)
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write {final}: {e.strerror or e}") from e
    return final


def _unsafe_member(ti, root: str) -> str | None:
    name = ti.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or Path(name).is_absolute():
        return "an absolute path"
    if ".." in parts:
        return "a '..' component"
    if not parts or parts[0] != root:
        return f"a path outside the archive's bundle folder '{root}'"
    if ti.issym() or ti.islnk():
        return "a link"  # bundles hold plain files only; a link could point anywhere
    if not (ti.isfile() or ti.isdir()):
        return "a device, FIFO or other special file"
    return None


MAX_UNPACKED_BYTES = 16 << 30  # a bundle larger than 16 GiB unpacked is refused unless raised
MAX_RATIO = 100  # unpacked / packed size; model weights compress about 1.1x, zeros 1000x
RATIO_FROM_BYTES = 16 << 20  # the ratio is judged once more than 16 MiB would be unpacked


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _members_within_bounds(tar, archive: Path, max_bytes: int, max_ratio: float) -> list:
    """The archive's members, read header by header, stopping as soon as the declared sizes cross a bound
    (before the member that crosses it is decompressed, and before anything is written)."""
    import tarfile

    packed = max(archive.stat().st_size, 1)
    members, total = [], 0
    try:
        while (ti := tar.next()) is not None:
            members.append(ti)
            total += max(ti.size, 0)
            if total > max_bytes:
                raise BundleError(f"{archive}: refused: it would unpack to more than {_human(max_bytes)} "
                                  "(--max-unpacked-size raises the limit); nothing was written")
            if total > RATIO_FROM_BYTES and total / packed > max_ratio:
                raise BundleError(f"{archive}: refused: it would unpack to more than {max_ratio:g}x its packed size "
                                  f"({packed} bytes; a compression bomb?) (--max-ratio raises the limit); "
                                  "nothing was written")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"{archive} is truncated or corrupt: {e}") from e
    return members


def unpack(archive: Path, dest: Path, *, max_bytes: int = MAX_UNPACKED_BYTES, max_ratio: float = MAX_RATIO) -> Path:
    """Unpack a packed bundle into `dest/<name>` and verify it; refuse anything unsafe before writing.

    Refused: absolute paths, '..' components, links of any kind, special files, members outside the one
    top-level bundle folder, and archives whose declared sizes exceed `max_bytes` in all or `max_ratio`
    times the archive's size. The bundle is extracted into a temporary folder, verified, then renamed.
    """
    import tarfile

    archive, dest = Path(archive), Path(dest)
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except (OSError, tarfile.TarError, EOFError) as e:
        raise BundleError(f"{archive} is not a readable .tar.gz: {e}") from e
    with tar:
        members = _members_within_bounds(tar, archive, max_bytes, max_ratio)
        if not members:
            raise BundleError(f"{archive} is empty")
        root = Path(members[0].name).parts[0] if Path(members[0].name).parts else ""
        if root in ("", ".", "..") or root.startswith("."):
            raise BundleError(f"{archive}: the first member {members[0].name!r} is not a bundle folder")
        for ti in members:
            why = _unsafe_member(ti, root)
            if why:
                raise BundleError(f"{archive}: refused member {ti.name!r}: {why}")
        check_output_folder(dest)
        final = dest / root
        if final.exists():
            raise BundleError(f"{final} already exists; remove it or unpack elsewhere")
        tmp = dest / f".{root}.unpack-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            tar.extractall(tmp, members=members, filter="data")
            bad = verify_files(tmp / root)
            if bad:
                raise IntegrityError(f"{archive}: files do not match the manifest: {', '.join(bad)}", bad)
            os.replace(tmp / root, final)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise BundleError(f"cannot unpack {archive}: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
