"""Data sources and fixed splits: numpy arrays keyed by input name, or `LazyRows` where the rows are made
on access (image files, decoded batch by batch: the train split of a folder larger than memory streams).

Sources: scikit-learn's bundled `digits` (the embedded default), a folder of `.npz`/`.npy` files, or a
`module:function` that yields batches. Every array is checked against the recipe's input spec (shape,
dtype, finite values) before anything trains or calibrates on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgebundle.core.errors import DataError, RecipeError, not_a_folder
from edgebundle.core.limits import time_limit
from edgebundle.core.recipe import DataSpec, InputSpec, Recipe
from edgebundle.core.rows import LazyRows
from edgebundle.core.modelio import import_object

LABEL_KEYS = ("y", "label", "labels")


@dataclass(frozen=True)
class Split:
    inputs: dict[str, np.ndarray | LazyRows]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray) -> Split:
        return Split({k: v.view(idx) if isinstance(v, LazyRows) else v[idx] for k, v in self.inputs.items()},
                     None if self.labels is None else self.labels[idx])

    def materialized(self) -> Split:
        """The same split with every lazy input made (in memory)."""
        if not any(isinstance(v, LazyRows) for v in self.inputs.values()):
            return self
        return Split({k: np.asarray(v) for k, v in self.inputs.items()}, self.labels)

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

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def calibration(self, spec: DataSpec, samples: int | None = None) -> Split:
        return self.split(spec.calibration_split).head(samples or spec.calibration_samples).materialized()


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


def _folder(path: Path, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if not path.is_dir():
        raise DataError(not_a_folder(path, "data folder"))
    files = sorted([*path.glob("*.npz"), *path.glob("*.npy")])
    if not files:
        raise DataError(f"data folder {path} has no .npz or .npy files")
    names = [s.name for s in specs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels: list[np.ndarray] = []
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
        except (ValueError, OSError) as e:
            why = ("not a numpy .npz/.npy file, or it holds pickled objects (never loaded: they can run code)"
                   if "pickled" in str(e) else str(e))
            raise DataError(f"cannot read data file {f}: {why}") from e
    if labels and len(labels) != len(files):
        raise DataError(f"data folder {path}: some files have labels and some do not")
    return _joined(parts, labels, f"data folder {path}", "file", [f.name for f in files])


def _function(ref: str, specs: list[InputSpec], base_dir: Path, kwargs: dict | None = None,
              timeout_s: float | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    fn = import_object(ref, base_dir=base_dir, what="data.function", timeout_s=timeout_s)
    with time_limit(timeout_s, f"data.function {ref}"):
        return _read_batches(fn, ref, specs, kwargs)


def _read_batches(fn, ref: str, specs: list[InputSpec], kwargs: dict | None
                  ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    names = [s.name for s in specs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels: list[np.ndarray] = []
    try:
        batches = iter(fn(**(kwargs or {})))
    except TypeError as e:
        raise DataError(f"data.function {ref} cannot be called with {kwargs or 'no arguments'}: {e}") from e
    except (Exception, SystemExit) as e:  # user code: any failure is the data's, in one line
        raise DataError(f"data.function {ref} failed: {_what(e)}") from e
    i = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (Exception, SystemExit) as e:  # a generator that raises midway
            raise DataError(f"data.function {ref} failed after {i} batch(es): {_what(e)}") from e
        i += 1
        if isinstance(batch, dict):
            for n in names:
                if n not in batch:
                    raise DataError(f"data.function batch has no '{n}' (keys: {', '.join(batch)})")
                parts[n].append(np.asarray(batch[n]))
            lab = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        elif isinstance(batch, tuple) and len(batch) == 2 and len(names) == 1:
            parts[names[0]].append(np.asarray(batch[0]))
            lab = batch[1]
        elif len(names) == 1:
            parts[names[0]].append(np.asarray(batch))
            lab = None
        else:
            raise DataError("data.function must yield dicts keyed by input name for multi-input models")
        if lab is not None:
            labels.append(np.asarray(lab))
    if not parts[names[0]]:
        raise DataError(f"data.function {ref} yielded no batches")
    return _joined(parts, labels, f"data.function {ref}", "batch")


def _what(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code})"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


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
        if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
            raise DataError(f"{source}: labels in {where} are {y.dtype}, not integer classes")
        if y.size and y.min() < 0:
            raise DataError(f"{source}: labels in {where} include {int(y.min())}; classes are 0, 1, 2, ...")
    return inputs, np.concatenate(labels).astype(np.int64)


def data_config_json(spec: DataSpec) -> str:
    """The data spec as it enters cache keys: fields added later are left out at their defaults, so work
    folders prepared before they existed stay valid."""
    unset = {"kwargs"} if not spec.kwargs else set()
    unset |= {f for f in ("image", "text", "datasets", "max_eval_samples") if getattr(spec, f) is None}
    return spec.model_dump_json(exclude=unset)


def _source(recipe: Recipe) -> tuple[dict[str, np.ndarray], np.ndarray | None, list[str]]:
    from edgebundle.core import sources
    from edgebundle.core.recipe import ImageSpec, TextSpec

    spec = recipe.data
    hf = recipe.resolve(recipe.model.hf) if getattr(recipe.model, "hf", None) is not None else None
    if spec.kind == "images":
        if len(recipe.inputs) != 1:
            raise RecipeError("data.kind images feeds a model with one input")
        x, labels, classes = sources.read_images(recipe.resolve(spec.path), spec.image or ImageSpec(),
                                                 recipe.inputs[0], hf)
        return {recipe.inputs[0].name: x}, labels, classes
    text = spec.text or TextSpec()
    folder = recipe.resolve(text.tokenizer) if text.tokenizer is not None else hf
    if spec.kind == "datasets":
        return sources.read_datasets(recipe.resolve(spec.path), spec.datasets, recipe.inputs,
                                     image=spec.image or ImageSpec(), tokenizer_folder=folder, hf_folder=hf)
    if folder is None:
        raise RecipeError("data.kind text needs a tokenizer: data.text.tokenizer (a local folder) or model.hf")
    return sources.read_text(recipe.resolve(spec.path), text, recipe.inputs, folder)


def load_dataset(recipe: Recipe) -> Dataset:
    spec = recipe.data
    classes: list[str] = []
    if spec.kind == "digits":
        inputs, labels = _digits(recipe.inputs)
    elif spec.kind == "folder":
        inputs, labels = _folder(recipe.resolve(spec.path), recipe.inputs)
    elif spec.kind in ("images", "text", "datasets"):
        inputs, labels, classes = _source(recipe)
    else:
        inputs, labels = _function(spec.function, recipe.inputs, recipe.base_dir, spec.kwargs,
                                   recipe.limits.user_code_s)
    inputs = check_inputs(inputs, recipe.inputs, what=f"data ({spec.kind})")
    n = len(next(iter(inputs.values())))
    if labels is not None and len(labels) != n:
        raise DataError(f"data ({spec.kind}): {n} samples but {len(labels)} labels")
    if n < 10:
        raise DataError(f"data ({spec.kind}): {n} samples is too few to split into train/val/test")

    h = hashlib.sha256()
    for k in sorted(inputs):
        h.update(k.encode())
        v = inputs[k]
        h.update(v.fingerprint.encode() if isinstance(v, LazyRows) else v.tobytes())
    if labels is not None:
        h.update(labels.tobytes())
    h.update(data_config_json(spec).encode())

    perm = np.random.default_rng(spec.seed).permutation(n)
    n_train = int(round(spec.splits.train * n))
    n_val = int(round(spec.splits.val * n))
    n_test = n - n_train - n_val
    if spec.max_eval_samples is not None:  # the rest of val and test is left out
        n_val, n_test = min(n_val, spec.max_eval_samples), min(n_test, spec.max_eval_samples)
    whole = Split(inputs, labels)
    # val and test are made once, in memory (every build judges on them); train streams where it is lazy
    return Dataset(
        train=whole.take(perm[:n_train]),
        val=whole.take(perm[n_train:n_train + n_val]).materialized(),
        test=whole.take(perm[n_train + n_val:n_train + n_val + n_test]).materialized(),
        fingerprint=h.hexdigest(),
        num_classes=None if labels is None else max(int(labels.max()) + 1, len(classes)),
        classes=tuple(classes),
    )
