"""Data sources and fixed splits: numpy arrays keyed by input name, or `LazyRows` where the rows are made
on access (image files, decoded batch by batch: the train split of a folder larger than memory streams).

Sources: scikit-learn's bundled `digits` (the embedded default), a folder of `.npz`/`.npy` files, or a
`module:function` that yields batches. Every array is checked against the recipe's input spec (shape,
dtype, finite values) before anything trains or calibrates on it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgebundle.core.errors import DataError, RecipeError, first_line, not_a_folder
from edgebundle.core.limits import time_limit
from edgebundle.core.recipe import DataSpec, InputSpec, Recipe
from edgebundle.core.rows import MAX_CLASS, LazyRows
from edgebundle.core.modelio import import_object

LABEL_KEYS = ("y", "label", "labels")
GROUP_KEYS = ("group", "groups")


@dataclass(frozen=True)
class Split:
    inputs: dict[str, np.ndarray | LazyRows]
    labels: np.ndarray | None
    groups: np.ndarray | None = None  # one id per input: inputs of one source (photo, video, document); None: each its own
    made_from: dict[str, LazyRows] | None = None  # materialized inputs' lazy rows, kept to store them compactly

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray) -> Split:
        return Split({k: v.view(idx) if isinstance(v, LazyRows) else v[idx] for k, v in self.inputs.items()},
                     None if self.labels is None else self.labels[idx],
                     None if self.groups is None else self.groups[idx],
                     None if self.made_from is None else {k: v.view(idx) for k, v in self.made_from.items()})

    def materialized(self) -> Split:
        """The same split with every lazy input made (in memory)."""
        lazy = {k: v for k, v in self.inputs.items() if isinstance(v, LazyRows)}
        if not lazy:
            return self
        return Split({k: np.asarray(v) for k, v in self.inputs.items()}, self.labels, self.groups,
                     {**(self.made_from or {}), **lazy})

    def lazy(self, name: str) -> LazyRows | None:
        """Input `name`'s rows as made on access, where they came from a lazy source (made or not yet)."""
        v = self.inputs[name]
        return v if isinstance(v, LazyRows) else (self.made_from or {}).get(name)

    def group_count(self) -> int:
        """Independent sources among the inputs (the inputs themselves where no groups were given)."""
        return len(self) if self.groups is None else len(np.unique(self.groups))

    def head(self, n: int) -> Split:
        return self.take(np.arange(min(n, len(self))))


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    fingerprint: str
    num_classes: int | None
    classes: tuple[str, ...] = ()  # class names in label order, where the source names them
    splits: dict[str, Any] | None = None  # inputs and groups per split (splits_record), for the manifest
    unlabelled: Split | None = None  # data.unlabelled's inputs distillation learns from (no labels)
    held_out: Split | None = None  # data.unlabelled's held-out groups: the out-of-distribution check

    @functools.cached_property
    def distill_train(self) -> Split:
        """What distillation learns from: the training split, and data.unlabelled's inputs after it (then
        without labels: the teacher alone teaches). Joined once: the search's candidates and distill share it."""
        if self.unlabelled is None:
            return self.train
        return Split({k: joined_rows(self.train.inputs[k], self.unlabelled.inputs[k]) for k in self.train.inputs},
                     None)

    @property
    def grouped(self) -> str | None:
        """Where the groups came from (None: every input its own group, or a work folder from before groups)."""
        return (self.splits or {}).get("grouped_by")

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def calibration(self, spec: DataSpec, samples: int | None = None) -> Split:
        return self.split(spec.calibration_split).head(samples or spec.calibration_samples).materialized()


def joined_rows(a, b) -> LazyRows:
    """The rows of `a` then those of `b` (arrays or LazyRows), made on access."""
    na = len(a)

    def make(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        first = rows < na
        out = np.empty((len(rows), *a.shape[1:]), a.dtype)
        if first.any():
            out[first] = a[rows[first]]
        if (~first).any():
            out[~first] = b[rows[~first] - na]
        return out

    fp = "+".join(x.fingerprint if isinstance(x, LazyRows) else hashlib.sha256(np.ascontiguousarray(x)).hexdigest()
                  for x in (a, b))
    return LazyRows(make, tuple(a.shape[1:]), a.dtype, np.arange(na + len(b)), fp)


def _inputs_fingerprint(inputs: dict[str, np.ndarray]) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(inputs[k]).tobytes() for k in sorted(inputs))).hexdigest()


def _unlabelled(recipe: Recipe) -> tuple[Split, Split | None, str] | None:
    """data.unlabelled as (the part distillation sees, the held-out part, its fingerprint): the held-out part is a
    seeded share of its groups (files or folders, text rows or documents)."""
    from edgebundle.core import sources
    from edgebundle.core.recipe import ImageSpec, TextSpec

    spec, u = recipe.data, recipe.data.unlabelled
    if u is None:
        return None
    by = u.group_by if u.group_by != "auto" else spec.group_by
    path = recipe.resolve(u.path) if u.path is not None else u.function
    if spec.kind == "function":
        inputs, _, groups = _function(u.function, recipe.inputs, recipe.base_dir, u.kwargs, recipe.limits.user_code_s,
                                      what="data.unlabelled.function")
        inputs = check_inputs(inputs, recipe.inputs, what="data.unlabelled")
        groups = groups if groups is not None and by != "none" else np.arange(len(next(iter(inputs.values()))))
        fp = _inputs_fingerprint(inputs)
    elif spec.kind == "images":
        x, _, _ = sources.read_images(path, spec.image or ImageSpec(), recipe.inputs[0], _hf_folder(recipe), "auto")
        inputs: dict[str, Any] = {recipe.inputs[0].name: x}
        groups = sources.image_groups(path, "folder" if by == "folder" else "auto")
        fp = x.fingerprint
    else:
        text = (spec.text or TextSpec()).model_copy(update={"label_column": None})
        inputs, _, _ = sources.read_text(path, text, recipe.inputs, _tokenizer_folder(recipe, text))
        inputs = check_inputs(inputs, recipe.inputs, what="data.unlabelled")
        n = len(next(iter(inputs.values())))
        groups = sources.text_groups(path, text) if by == "document" else np.arange(n).astype(str)
        fp = _inputs_fingerprint(inputs)
    whole = Split(inputs, None, np.asarray(groups))
    uniq = np.unique(whole.groups)
    rng = np.random.default_rng(recipe.data.seed + 1)
    is_held = np.isin(whole.groups, rng.permutation(uniq)[:int(round(u.held_out * len(uniq)))])
    if is_held.all():
        raise DataError(f"data.unlabelled {path}: held_out leaves nothing to learn from")
    out = whole.take(np.flatnonzero(~is_held))
    held_part = whole.take(np.flatnonzero(is_held)).materialized() if is_held.any() else None
    return out, held_part, f"{fp}:{u.held_out}"


def iter_feeds(split: Split, specs: list[InputSpec], batch: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of `batch` samples each, in order; the last one is shorter when the batch axis is dynamic.

    A static batch dimension forces batch = spec.shape[0], and a trailing remainder is then left out.
    """
    if len(split) == 0:
        raise DataError("calibration data is empty")
    static = {s.shape[0] for s in specs if 0 not in s.dynamic_axes}
    if static:
        batch = static.pop()
    for i in range(0, len(split), batch):
        if static and i + batch > len(split):
            break
        yield {s.name: split.inputs[s.name][i:i + batch] for s in specs}


def run_outputs(session, split: Split, specs: list[InputSpec], batch_hint: int = 64) -> list[np.ndarray]:
    """Every output of a session over a whole split, in order (batches of `batch_hint` where allowed)."""
    parts = [session.run(f) for f in iter_feeds(split, specs, batch_hint)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def run_split(session, split: Split, specs: list[InputSpec], batch_hint: int = 64, output: int = 0) -> np.ndarray:
    """One output of a session (the first by default) over a whole split, in order."""
    return np.concatenate([session.run(f)[output] for f in iter_feeds(split, specs, batch_hint)])


def check_inputs(inputs: dict[str, np.ndarray], specs: list[InputSpec], *, what: str) -> dict[str, np.ndarray]:
    """Validate arrays against the input spec (per-sample shape, dtype kind, finite, non-empty)."""
    out: dict[str, np.ndarray] = {}
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise DataError(f"{what}: no array for input(s) {', '.join(missing)}; got {', '.join(inputs) or 'none'}")
    n = None
    for spec in specs:
        if isinstance(inputs[spec.name], LazyRows):  # rows made by a source that checks what it makes
            lazy = inputs[spec.name]
            if not _shape_matches(list(lazy.sample_shape), _sample_shape(spec), spec):
                raise DataError(f"{what}: input '{spec.name}' has per-sample shape {list(lazy.sample_shape)}, "
                                f"the input spec says {_sample_shape(spec)}")
            if n is not None and len(lazy) != n:
                raise DataError(f"{what}: inputs have different sample counts ({n} vs {len(lazy)})")
            n = len(lazy)
            out[spec.name] = lazy
            continue
        a = np.asarray(inputs[spec.name])
        if a.size == 0 or a.ndim == 0 or len(a) == 0:
            raise DataError(f"{what}: input '{spec.name}' is empty (shape {list(a.shape)})")
        want = np.dtype(spec.dtype)
        if a.dtype.kind != want.kind and not (a.dtype.kind in "iu" and want.kind in "iu"):
            raise DataError(f"{what}: input '{spec.name}' has dtype {a.dtype}, the input spec says {spec.dtype}")
        a = a.astype(want, copy=False)
        sample = list(a.shape[1:])
        expected = _sample_shape(spec)
        if not _shape_matches(sample, expected, spec):
            raise DataError(
                f"{what}: input '{spec.name}' has per-sample shape {sample}, the input spec says {expected}"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise DataError(f"{what}: input '{spec.name}' has {bad} NaN/Inf value(s)")
        if n is not None and len(a) != n:
            raise DataError(f"{what}: inputs have different sample counts ({n} vs {len(a)})")
        n = len(a)
        out[spec.name] = np.ascontiguousarray(a)
    return out


def _sample_shape(spec: InputSpec) -> list[int]:
    return list(spec.shape[1:])


def _shape_matches(sample: list[int], expected: list[int], spec: InputSpec) -> bool:
    if len(sample) != len(expected):
        return False
    dynamic = {a - 1 for a in spec.dynamic_axes if a > 0}
    return all(i in dynamic or s == e for i, (s, e) in enumerate(zip(sample, expected)))


def _digits(specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # 0..16 -> -1..1
    x = x[:, None, :, :]  # N, 1, 8, 8
    return {specs[0].name: x}, d.target.astype(np.int64)


def _folder(path: Path, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
    if not path.is_dir():
        raise DataError(not_a_folder(path, "data folder"))
    files = sorted([*path.glob("*.npz"), *path.glob("*.npy")])
    if not files:
        raise DataError(f"data folder {path} has no .npz or .npy files")
    names = [s.name for s in specs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    for f in files:
        try:
            if f.suffix == ".npy":
                if len(names) != 1:
                    raise DataError(f"{f.name}: .npy files only work for single-input models; use .npz")
                parts[names[0]].append(np.load(f, allow_pickle=False))
                continue
            with np.load(f, allow_pickle=False) as z:
                keys = set(z.files)
                for n in names:
                    key = n if n in keys else ("x" if len(names) == 1 and "x" in keys else None)
                    if key is None:
                        raise DataError(f"{f.name}: no array named '{n}' (has {', '.join(sorted(keys))})")
                    parts[n].append(z[key])
                lab = next((k for k in LABEL_KEYS if k in keys), None)
                if lab is not None:
                    labels.append(z[lab])
                grp = next((k for k in GROUP_KEYS if k in keys), None)
                if grp is not None:
                    groups.append(z[grp])
        except (ValueError, OSError) as e:
            why = ("not a numpy .npz/.npy file, or it holds pickled objects (never loaded: they can run code)"
                   if "pickled" in str(e) else str(e))
            raise DataError(f"cannot read data file {f}: {why}") from e
    if labels and len(labels) != len(files):
        raise DataError(f"data folder {path}: some files have labels and some do not")
    source, names_ = f"data folder {path}", [f.name for f in files]
    inputs, y = _joined(parts, labels, source, "file", names_)
    return inputs, y, _joined_groups(groups, parts, source, "file", names_)


def _function(ref: str, specs: list[InputSpec], base_dir: Path, kwargs: dict | None = None,
              timeout_s: float | None = None, what: str = "data.function"
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
    """`what`: the recipe field errors name (data.function, data.unlabelled.function)."""
    fn = import_object(ref, base_dir=base_dir, what=what, timeout_s=timeout_s)
    with time_limit(timeout_s, f"{what} {ref}"):
        return _read_batches(fn, ref, specs, kwargs, what)


def _read_batches(fn, ref: str, specs: list[InputSpec], kwargs: dict | None, what: str = "data.function"
                  ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
    names = [s.name for s in specs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    try:
        made = fn(**(kwargs or {}))
    except TypeError as e:
        raise DataError(f"{what} {ref} cannot be called with {kwargs or 'no arguments'}: {e}") from e
    except (Exception, SystemExit) as e:  # user code: any failure is the data's, in one line
        raise DataError(f"{what} {ref} failed: {_what(e)}") from e
    try:
        batches = iter(made)
    except TypeError as e:
        raise DataError(f"{what} {ref} returned {type(made).__name__}, not batches (a list or generator of "
                        "arrays, (inputs, labels) pairs or dicts)") from e
    i = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (Exception, SystemExit) as e:  # a generator that raises midway
            raise DataError(f"{what} {ref} failed after {i} batch(es): {_what(e)}") from e
        i += 1
        if isinstance(batch, dict):
            for n in names:
                if n not in batch:
                    raise DataError(f"{what} batch has no '{n}' (keys: {', '.join(batch)})")
                parts[n].append(_array(batch[n], what, ref, i, f"'{n}'"))
            lab = next((batch[k] for k in LABEL_KEYS if k in batch), None)
            grp = next((batch[k] for k in GROUP_KEYS if k in batch), None)
            if grp is not None:
                groups.append(_array(grp, what, ref, i, "groups"))
        elif isinstance(batch, tuple) and len(batch) == 2 and len(names) == 1:
            parts[names[0]].append(_array(batch[0], what, ref, i, "inputs"))
            lab = batch[1]
        elif len(names) == 1:
            parts[names[0]].append(_array(batch, what, ref, i, "inputs"))
            lab = None
        else:
            raise DataError(f"{what} must yield dicts keyed by input name for multi-input models")
        if lab is not None:
            labels.append(_array(lab, what, ref, i, "labels"))
    if not parts[names[0]]:
        raise DataError(f"{what} {ref} yielded no batches")
    inputs, y = _joined(parts, labels, f"{what} {ref}", "batch")
    return inputs, y, _joined_groups(groups, parts, f"{what} {ref}", "batch")


def _array(x: Any, what: str, ref: str, batch: int, part: str) -> np.ndarray:
    """One part of a batch as an array (a torch tensor detached from its graph first); rows that do not form one
    array (ragged lists) are the data's error, in one line."""
    if hasattr(x, "detach") and callable(x.detach):
        x = x.detach().cpu()
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as e:
        raise DataError(f"{what} {ref}: {part} in batch {batch} is not one array ({_what(e)})") from e


def _what(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code})"
    return first_line(e)


def _joined(parts: dict[str, list[np.ndarray]], labels: list[np.ndarray], source: str, unit: str,
            names: list[str] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Concatenate per-batch (or per-file) arrays, naming the batch or file whose per-sample shape, or whose
    labels, do not fit."""
    inputs = {}
    for n, arrays in parts.items():
        first = arrays[0].shape[1:]
        for k, a in enumerate(arrays):
            if a.ndim == 0 or a.shape[1:] != first:
                where = names[k] if names else f"{unit} {k + 1}"
                raise DataError(f"{source}: input '{n}' in {where} has per-sample shape {list(a.shape[1:])}, the "
                                f"first has {list(first)}")
        inputs[n] = np.concatenate(arrays)
    if not labels:
        return inputs, None
    for k, y in enumerate(labels):
        where = names[k] if names else f"{unit} {k + 1}"
        if y.ndim != 1:
            raise DataError(f"{source}: labels in {where} have shape {list(y.shape)}; one integer class per sample")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise DataError(f"{source}: labels in {where} include NaN or Inf; one integer class per sample")
        if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
            raise DataError(f"{source}: labels in {where} are {y.dtype}, not integer classes")
        if y.size and y.max() > MAX_CLASS:
            raise DataError(f"{source}: labels in {where} include {y.max():.6g}; classes are 0, 1, 2, ... (at most "
                            f"{MAX_CLASS})")
        if y.size and y.min() < 0:
            raise DataError(f"{source}: labels in {where} include {int(y.min())}; classes are 0, 1, 2, ...")
    return inputs, np.concatenate(labels).astype(np.int64)


def _joined_groups(groups: list[np.ndarray], parts: dict[str, list[np.ndarray]], source: str, unit: str,
                   names: list[str] | None = None) -> np.ndarray | None:
    """Per-batch (or per-file) group ids joined, one per input; None where none were given."""
    if not groups:
        return None
    sizes = [len(a) for a in next(iter(parts.values()))]
    if len(groups) != len(sizes):
        raise DataError(f"{source}: some {unit}es give groups and some do not" if unit == "batch" else
                        f"{source}: some {unit}s give groups and some do not")
    for k, (g, n) in enumerate(zip(groups, sizes)):
        where = names[k] if names else f"{unit} {k + 1}"
        if g.ndim != 1 or len(g) != n:
            raise DataError(f"{source}: groups in {where} have shape {list(g.shape)}; one group id per input "
                            f"({n} inputs)")
        if g.dtype.kind not in "iuUSO":
            raise DataError(f"{source}: groups in {where} are {g.dtype}; group ids are integers or strings")
    return np.concatenate([g.astype(str) for g in groups])


def data_config_json(spec: DataSpec) -> str:
    """The data spec as it enters cache keys: fields added later are left out at their defaults, so work
    folders prepared before they existed stay valid."""
    unset = {"kwargs"} if not spec.kwargs else set()
    unset |= {f for f in ("image", "text", "datasets", "max_eval_samples", "unlabelled") if getattr(spec, f) is None}
    exclude: dict[str, Any] = {f: True for f in unset}
    if spec.group_by == "auto":
        exclude["group_by"] = True
    if spec.text is not None and spec.text.document_column == "document":
        exclude["text"] = {"document_column"}
    return spec.model_dump_json(exclude=exclude)


def _source(recipe: Recipe) -> tuple[dict[str, np.ndarray], np.ndarray | None, list[str], np.ndarray | None]:
    from edgebundle.core import sources
    from edgebundle.core.recipe import ImageSpec, TextSpec

    spec = recipe.data
    hf = _hf_folder(recipe)
    if spec.kind == "images":
        if len(recipe.inputs) != 1:
            raise RecipeError("data.kind images feeds a model with one input")
        folder = recipe.resolve(spec.path)
        x, labels, classes = sources.read_images(folder, spec.image or ImageSpec(), recipe.inputs[0], hf, spec.group_by)
        return {recipe.inputs[0].name: x}, labels, classes, sources.image_groups(folder, spec.group_by)
    text = spec.text or TextSpec()
    if spec.kind == "datasets":
        folder = recipe.resolve(text.tokenizer) if text.tokenizer is not None else hf
        return (*sources.read_datasets(recipe.resolve(spec.path), spec.datasets, recipe.inputs,
                                       image=spec.image or ImageSpec(), tokenizer_folder=folder, hf_folder=hf), None)
    path = recipe.resolve(spec.path)
    groups = sources.text_groups(path, text) if spec.group_by == "document" else None
    return (*sources.read_text(path, text, recipe.inputs, _tokenizer_folder(recipe, text)), groups)


def _hf_folder(recipe: Recipe) -> Path | None:
    """model.hf's folder, where the model comes from one (its image processor and tokenizer live there)."""
    return recipe.resolve(recipe.model.hf) if getattr(recipe.model, "hf", None) is not None else None


def _tokenizer_folder(recipe: Recipe, text) -> Path:
    """Where kind text's tokenizer is: data.text.tokenizer, else model.hf's folder (a RecipeError without one)."""
    folder = recipe.resolve(text.tokenizer) if text.tokenizer is not None else _hf_folder(recipe)
    if folder is None:
        raise RecipeError("data.kind text needs a tokenizer: data.text.tokenizer (a local folder) or model.hf")
    return folder


GROUPED_BY = {"function": "the data function's 'group'", "folder": "the .npz files' 'group'",
              "images": "image file", "text": "document"}


def load_dataset(recipe: Recipe) -> Dataset:
    spec = recipe.data
    classes: list[str] = []
    groups = None
    if spec.kind == "digits":
        inputs, labels = _digits(recipe.inputs)
    elif spec.kind == "folder":
        inputs, labels, groups = _folder(recipe.resolve(spec.path), recipe.inputs)
    elif spec.kind in ("images", "text", "datasets"):
        inputs, labels, classes, groups = _source(recipe)
    else:
        inputs, labels, groups = _function(spec.function, recipe.inputs, recipe.base_dir, spec.kwargs,
                                           recipe.limits.user_code_s)
    inputs = check_inputs(inputs, recipe.inputs, what=f"data ({spec.kind})")
    n = len(next(iter(inputs.values())))
    if labels is not None and len(labels) != n:
        raise DataError(f"data ({spec.kind}): {n} samples but {len(labels)} labels")
    if n < 10:
        raise DataError(f"data ({spec.kind}): {n} samples is too few to split into train/val/test")
    if spec.group_by == "none":
        groups = None
    grouped = None if groups is None else (
        "image folder" if spec.kind == "images" and spec.group_by == "folder" else GROUPED_BY[spec.kind])
    h = hashlib.sha256()
    for k in sorted(inputs):
        h.update(k.encode())
        v = inputs[k]
        h.update(v.fingerprint.encode() if isinstance(v, LazyRows) else v.tobytes())
    if labels is not None:
        h.update(labels.tobytes())
    if groups is not None and spec.kind != "images":  # an image folder's groups follow from its file names
        h.update("\0".join(groups.tolist()).encode())
    h.update(data_config_json(spec).encode())
    extra = _unlabelled(recipe)
    if extra is not None:
        h.update(extra[2].encode())
    train, val, test = _split_indices(n, groups, spec)
    whole = Split(inputs, labels, groups)
    # val and test are made once, in memory (every build judges on them); train streams where it is lazy
    splits = {"train": whole.take(train), "val": whole.take(val).materialized(),
              "test": whole.take(test).materialized()}
    return Dataset(
        **splits,
        fingerprint=h.hexdigest(),
        num_classes=None if labels is None else max(int(labels.max()) + 1, len(classes)),
        classes=tuple(classes),
        splits=splits_record(grouped, {**splits, **({"unlabelled": extra[0]} if extra else {}),
                                       **({"held_out": extra[1]} if extra and extra[1] is not None else {})}),
        unlabelled=extra[0] if extra else None,
        held_out=extra[1] if extra else None,
    )


def splits_record(grouped: str | None, splits: dict[str, Split]) -> dict[str, Any]:
    """The manifest's record of the splits: inputs and groups in each, and where the groups came from."""
    return {"grouped_by": grouped, **{name: {"inputs": len(sp), "groups": sp.group_count()}
                                      for name, sp in splits.items()}}


def _split_indices(n: int, groups: np.ndarray | None, spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, val and test indices. Without groups (or with every input its own group) a seeded permutation
    of the inputs cut at the split fractions, as always; with groups, a seeded permutation of the groups, each
    group whole in one split, cut where the inputs reach the fractions (no group in two splits). max_eval_samples
    caps val and test."""
    rng = np.random.default_rng(spec.seed)
    if groups is None or len(np.unique(groups)) == n:
        perm = rng.permutation(n)
        n_train = int(round(spec.splits.train * n))
        n_val = int(round(spec.splits.val * n))
        n_test = n - n_train - n_val
        if spec.max_eval_samples is not None:  # the rest of val and test is left out
            n_val, n_test = min(n_val, spec.max_eval_samples), min(n_test, spec.max_eval_samples)
        return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:n_train + n_val + n_test]
    uniq, inverse = np.unique(groups, return_inverse=True)
    if len(uniq) < 3:
        raise DataError(f"data: {len(uniq)} group(s) cannot be split into train, val and test without sharing one; "
                        "give more sources (photos, videos, documents) or data.group_by: none")
    order = rng.permutation(len(uniq))
    sizes = np.bincount(inverse, minlength=len(uniq))[order]
    ends = np.cumsum(sizes)
    # each split gets at least one group; the cut is the group boundary nearest the fraction of the inputs
    cut1 = int(np.clip(np.argmin(np.abs(ends - spec.splits.train * n)) + 1, 1, len(uniq) - 2))
    cut2 = int(np.clip(np.argmin(np.abs(ends - (spec.splits.train + spec.splits.val) * n)) + 1, cut1 + 1,
                       len(uniq) - 1))
    member = {g: np.flatnonzero(inverse == g) for g in range(len(uniq))}
    parts = [np.concatenate([member[g] for g in order[a:b]]) for a, b in ((0, cut1), (cut1, cut2), (cut2, len(uniq)))]
    parts = [rng.permutation(p) for p in parts]
    if spec.max_eval_samples is not None:
        parts[1], parts[2] = parts[1][:spec.max_eval_samples], parts[2][:spec.max_eval_samples]
    return parts[0], parts[1], parts[2]
