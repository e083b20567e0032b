"""Data as users have it: a folder of images, a text file. Each becomes arrays keyed by input name.

- `images`: JPEG/PNG/BMP/WebP files (decoded lazily, batch by batch: see `core.data.LazyRows`), either in class sub-folders (labels from the sub-folder names, in sorted
  order; the order is returned so it can be recorded) or flat (unlabeled). Each is decoded with Pillow,
  converted to RGB (or L for one channel), resized so its shorter side is `resize`, center-cropped to the
  input's height x width, scaled to 0..1 and normalized with `mean`/`std` per channel, channels first
  unless the input is NHWC. With `model.hf` of task image-classification and no `mean`/`std`, the
  folder's image processor gives them (and its resize).
- `text`: a `.txt` file (one text per line, optionally `text<TAB>label`), a `.csv` or a `.jsonl` with named
  columns; tokenized with the tokenizer of `data.tokenizer` (a local folder) or of `model.hf`, padded and
  truncated to the input's sequence length. Labels: integers, or strings mapped to classes in sorted order.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgebundle.core.artifact import sha256_file
from edgebundle.core.errors import DataError, RecipeError, not_a_folder
from edgebundle.core.recipe import DatasetsSpec, ImageSpec, InputSpec, TextSpec
from edgebundle.core.rows import MAX_CLASS, LazyRows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _image_files(folder: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    if not folder.is_dir():
        raise DataError(not_a_folder(folder, "image folder"))
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:
        files, labels, classes = [], [], []
        for d in subdirs:
            found = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if found:
                classes.append(d.name)
                files += found
                labels += [len(classes) - 1] * len(found)
        if not files:
            raise DataError(f"image folder {folder}: its sub-folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
        return files, labels, classes
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}) and no class "
                        "sub-folders")
    return files, None, []


def _processor_defaults(hf_folder: Path | None) -> dict[str, Any]:
    """mean, std and resize from a Hugging Face image processor in the model folder, where there is one."""
    if hf_folder is None or not (hf_folder / "preprocessor_config.json").is_file():
        return {}
    cfg = json.loads((hf_folder / "preprocessor_config.json").read_text())
    out: dict[str, Any] = {}
    if "image_mean" in cfg and "image_std" in cfg:
        out.update(mean=list(cfg["image_mean"]), std=list(cfg["image_std"]))
    size = cfg.get("size")
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size.get("height")
    if isinstance(size, int):
        out["resize"] = size
    return out


def _image_transform(spec: ImageSpec, inp: InputSpec, hf_folder: Path | None):
    """(sample shape, transform: PIL image -> one row, the settings as text for hashing) for `inp`."""
    import importlib.util

    if importlib.util.find_spec("PIL") is None:
        raise RecipeError("image data needs Pillow: pip install edgebundle[images]")
    nhwc = spec.layout == "NHWC"
    if len(inp.shape) != 4:
        raise RecipeError(f"image data: input '{inp.name}' has shape {inp.shape}; images need 4 "
                          "dimensions (N, C, H, W or N, H, W, C)")
    c, h, w = (inp.shape[3], inp.shape[1], inp.shape[2]) if nhwc else inp.shape[1:4]
    if c not in (1, 3):
        raise RecipeError(f"image data: input '{inp.name}' has {c} channels; images give 1 or 3")
    d = {"resize": None, "mean": None, "std": None, **{k: v for k, v in _processor_defaults(hf_folder).items()}}
    d.update({k: v for k, v in spec.model_dump().items() if k in d and v is not None})
    mean = np.asarray(d["mean"] if d["mean"] is not None else [0.0] * c, np.float32)
    std = np.asarray(d["std"] if d["std"] is not None else [1.0] * c, np.float32)
    if len(mean) != c or len(std) != c:
        raise RecipeError(f"data.image: mean and std need {c} values (one per channel)")
    settings = json.dumps([d["resize"] or min(h, w), mean.tolist(), std.tolist(), nhwc, c, h, w])
    sample, pixels, normalize = _image_codec(settings)
    return sample, lambda im: normalize(pixels(im)), settings


def _image_codec(settings: str):
    """(sample shape, pixels: PIL image -> uint8 H x W x C (upright, resized so the shorter side is `resize`,
    center-cropped), normalize: those pixels -> one float32 row (0..1, mean/std, channels first unless NHWC))
    from the settings `_image_transform` hashes: what packed rows need to decode on another machine."""
    from PIL import Image

    resize, mean, std, nhwc, c, h, w = json.loads(settings)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def pixels(im) -> np.ndarray:
        im = _upright_8bit(im).convert("RGB" if c == 3 else "L")
        s = resize / min(im.size)
        im = im.resize((max(w, round(im.size[0] * s)), max(h, round(im.size[1] * s))), Image.Resampling.BILINEAR)
        left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
        return np.asarray(im.crop((left, top, left + w, top + h)), np.uint8).reshape(h, w, c)

    def normalize(u8: np.ndarray) -> np.ndarray:
        a = (u8.astype(np.float32) / 255.0 - mean) / std
        return a if nhwc else a.transpose(2, 0, 1)

    return ((h, w, c) if nhwc else (c, h, w)), pixels, normalize


def _upright_8bit(im):
    """EXIF orientation applied (what a viewer shows), and 16/32-bit grey scaled to 8 bits (not clipped)."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im) or im
    if im.mode.startswith("I") or im.mode == "F":  # Pillow opens 16-bit PNGs as I or I;16
        a = np.asarray(im, np.float64)
        full = 65535.0 if im.mode != "F" and a.max() <= 65535 else max(float(a.max()), 1.0)
        im = Image.fromarray(np.clip(a / full * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return im


PACKED_FILE, PACKED_PIXELS = 0, 1  # a packed row holds its image file's bytes, or its cropped pixels as PNG


def _pack_images(rows: np.ndarray, open_row, file_bytes, settings: str) -> dict[str, np.ndarray]:
    """Image rows as the bytes to decode them again: the image file itself where it is no larger than the
    cropped pixels (a JPEG crop is a fraction of its decoded float32 row), otherwise the cropped uint8 pixels
    as a lossless PNG (a 12-megapixel photo, or an image with no file: a data set's column)."""
    import io

    from PIL import Image

    (_, pixels, _), blobs, kinds = _image_codec(settings), [], []
    _, _, _, _, c, h, w = json.loads(settings)
    for r in rows:
        b = file_bytes(int(r)) if file_bytes is not None else None
        if b is None or len(b) > h * w * c:
            buf = io.BytesIO()
            u8 = pixels(open_row(int(r)))
            Image.fromarray(u8[:, :, 0] if c == 1 else u8, "L" if c == 1 else "RGB").save(buf, "PNG")
            b, kind = buf.getvalue(), PACKED_PIXELS
        else:
            kind = PACKED_FILE
        blobs.append(np.frombuffer(b, np.uint8))
        kinds.append(kind)
    return {"codec": np.asarray("images"), "settings": np.asarray(settings), **_blobs(np.asarray(kinds, np.uint8), blobs)}


def _blobs(kinds: np.ndarray, blobs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Packed rows' kinds and bytes, one buffer with each row's start (`offsets`, one more than rows)."""
    return {"kind": kinds, "offsets": np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64),
            "bytes": np.concatenate(blobs) if blobs else np.empty(0, np.uint8)}


def unpack_images(arrays: dict[str, np.ndarray], fingerprint: str) -> LazyRows:
    """Rows packed by `_pack_images`, decoded on access exactly as from the source (same Pillow)."""
    import io

    from PIL import Image

    settings = str(arrays["settings"])
    sample, pixels, normalize = _image_codec(settings)
    kinds, offsets, data = arrays["kind"], arrays["offsets"], arrays["bytes"]
    _, _, _, _, c, h, w = json.loads(settings)

    def make(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *sample), np.float32)
        for i, r in enumerate(rows):
            with Image.open(io.BytesIO(data[offsets[r]:offsets[r + 1]].tobytes())) as im:
                im.load()
                u8 = pixels(im) if kinds[r] == PACKED_FILE else np.asarray(im, np.uint8).reshape(h, w, c)
            out[i] = normalize(u8)
        return out

    return LazyRows(make, sample, np.float32, np.arange(len(kinds)), fingerprint,
                    pack=lambda rows: _repack(arrays, rows))


def _repack(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    offsets, data = arrays["offsets"], arrays["bytes"]
    return {**arrays, **_blobs(arrays["kind"][rows], [data[offsets[r]:offsets[r + 1]] for r in rows])}


def _lazy_images(n: int, open_row, sample, transform, fingerprint: str, settings: str, file_bytes=None) -> LazyRows:
    def make(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *sample), np.float32)
        for i, r in enumerate(rows):
            out[i] = transform(open_row(int(r)))
        return out

    return LazyRows(make, sample, np.float32, np.arange(n), fingerprint,
                    pack=lambda rows: _pack_images(rows, open_row, file_bytes, settings))


def image_groups(folder: Path, by: str) -> np.ndarray:
    """One group per file of the folder (auto), in read_images' order, or per folder holding the files
    (`folder`: frames stored one folder per video; a folder of such folders has no labels, class/video/frame.jpg
    has both)."""
    files, _, _ = _image_files(folder)
    if by == "folder":
        return np.asarray([f.parent.relative_to(folder).as_posix() for f in files])
    return np.asarray([f.relative_to(folder).as_posix() for f in files])


def read_images(folder: Path, spec: ImageSpec, inp: InputSpec, hf_folder: Path | None = None, group_by: str = "auto"
                ) -> tuple[LazyRows, np.ndarray | None, list[str]]:
    """(N x C x H x W float32 rows (or NHWC), labels or None, class names) from an image folder. The rows are
    lazy: each file's header is read here (an unreadable file is one line now, not mid-training) and the
    content hashed; pixels are decoded when rows are taken, so a folder larger than memory streams. With
    `group_by: folder`, folders holding the files directly are groups, not classes (image_groups)."""
    import hashlib

    from PIL import Image, UnidentifiedImageError

    sample, transform, settings = _image_transform(spec, inp, hf_folder)
    files, labels, classes = _image_files(folder)
    if group_by == "folder" and all(f.parent.parent == folder for f in files):
        labels, classes = None, []  # video/frame.jpg: the folders are groups, not classes (class/video/frame.jpg: both)

    def unreadable(f: Path, e: BaseException) -> DataError:
        if isinstance(e, Image.DecompressionBombError):
            return DataError(f"image {f} declares more pixels than Pillow decodes safely "
                             f"({str(e).split('exceeds')[0].removeprefix('Image size (').rstrip(' )')}): refused")
        return DataError(f"cannot read image {f}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    digest = hashlib.sha256(settings.encode())
    for f in files:
        try:
            with Image.open(f) as im:
                im.size  # noqa: B018  (the header parses)
            digest.update(f"{f.relative_to(folder).as_posix()}:{sha256_file(f)}".encode())
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            raise unreadable(f, e) from e

    def open_row(r: int):
        try:
            with Image.open(files[r]) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            raise unreadable(files[r], e) from e

    rows = _lazy_images(len(files), open_row, sample, transform, digest.hexdigest(), settings,
                        file_bytes=lambda r: files[r].read_bytes())
    return rows, None if labels is None else np.asarray(labels, np.int64), classes


CSV_FIELD_LIMIT = 1 << 30  # a field up to 1 GiB is read (Python's csv stops at 128 KiB by default)
CHARS_PER_TOKEN = 64  # a text is cut to this many characters per token of the input before tokenizing


def _rows(path: Path, spec: TextSpec, documents: bool = False
          ) -> tuple[list[str], list[Any] | None, list[str] | None]:
    """(texts, raw labels or None, document ids or None: given where `documents` asks for them)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            texts, labels, docs, doc = [], [], [], 0
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    if docs and docs[-1] == str(doc):
                        doc += 1  # a blank line ends a document (a paragraph)
                    continue
                text, tab, label = line.partition("\t")
                texts.append(text)
                labels.append(label.strip() if tab else None)
                docs.append(str(doc))
            have = [lab is not None for lab in labels]
            if any(have) and not all(have):
                raise DataError(f"{path}: some lines have a tab-separated label and some do not")
            return texts, labels if any(have) else None, docs if documents else None
        if suffix in (".csv", ".jsonl"):
            if suffix == ".csv":
                csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # long documents are texts too
                with path.open(newline="", encoding="utf-8") as fh:
                    try:
                        records = list(csv.DictReader(fh))
                    except csv.Error as e:
                        raise DataError(f"{path}: not a readable CSV file: {e}") from e
            else:
                records = []
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}, line {n}: not JSON: {e.msg}") from e
                        if not isinstance(record, dict):
                            raise DataError(f"{path}, line {n}: a JSON {type(record).__name__}, not an object; each "
                                            "line is one object with the text column")
                        records.append(record)
            if not records:
                raise DataError(f"text file {path} has no rows")
            cols = list(records[0])
            for col in (spec.text_column, spec.label_column, spec.document_column if documents else None):
                if col is not None and any(col not in r for r in records):
                    raise DataError(f"{path}: no column '{col}' in every row (columns: {', '.join(map(str, cols))})")
            texts = [str(r[spec.text_column]) for r in records]
            return (texts, None if spec.label_column is None else [r[spec.label_column] for r in records],
                    [str(r[spec.document_column]) for r in records] if documents else None)
    except UnicodeDecodeError as e:
        raise DataError(f"text file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DataError(f"cannot read text file {path}: {e.strerror or e}") from e
    raise DataError(f"text file {path}: unknown kind '{suffix}' (.txt, .csv or .jsonl)")


def _classes(labels: list[Any], path: Path) -> tuple[np.ndarray, list[str]]:
    """Integer labels as given; anything else mapped to classes in sorted order (the order recorded)."""
    bad = next((i for i, x in enumerate(labels) if x is None or isinstance(x, (dict, list))), None)
    if bad is not None:  # a missing label is no class named "None"
        what = "missing" if labels[bad] is None else f"a {type(labels[bad]).__name__}"
        raise DataError(f"{path}: the label of text {bad + 1} is {what}; one class per text (an integer or a name)")
    try:
        ints = [int(x) for x in labels]
        if all(str(x).strip() == str(i) for x, i in zip(labels, ints)):
            if min(ints) < 0 or max(ints) > MAX_CLASS:
                bad = min(ints) if min(ints) < 0 else max(ints)
                raise DataError(f"{path}: labels include {bad}; classes are 0, 1, 2, ... (at most {MAX_CLASS})")
            return np.asarray(ints, np.int64), []
    except (TypeError, ValueError):
        pass
    classes = sorted({str(x) for x in labels})
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[str(x)] for x in labels], np.int64), classes


def _need(module: str, what: str, extra: str):
    """The optional package `module`, or one line saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RecipeError(f"{what} needs the {module} package: pip install edgebundle[{extra}]") from e


# the files a saved tokenizer's vocabulary lives in (fast tokenizers, WordPiece, BPE, SentencePiece, tiktoken)
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
               "tokenizer.model", "source.spm", "bpe.codes", "tiktoken.model")
MAX_UNKNOWN_SHARE = 0.5  # more of the data's tokens than this mapped to the unknown token: the wrong tokenizer


def tokenizer_for(folder: Path) -> Any:
    AutoTokenizer = _need("transformers", "data.kind text", "hf").AutoTokenizer
    if not folder.is_dir():
        raise DataError(not_a_folder(folder, "tokenizer folder"))
    if not any((folder / f).is_file() for f in VOCAB_FILES):
        # transformers would build an empty tokenizer from config.json alone, mapping every word to [UNK]
        raise DataError(f"no tokenizer in {folder}: none of its vocabulary files ({', '.join(VOCAB_FILES[:4])}, "
                        "...) is there; save the tokenizer with save_pretrained next to the model, or name one "
                        "with data.text.tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"no tokenizer in {folder} (tokenizer.json or vocab files, saved with save_pretrained): "
                        f"{type(e).__name__}") from e


def read_text(path: Path, spec: TextSpec, inputs: list[InputSpec], tokenizer_folder: Path
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None, list[str]]:
    """Tokenized arrays for the recipe's inputs (input_ids, attention_mask, token_type_ids, as named)."""
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    texts, raw, _ = _rows(path, spec)
    if not texts:
        raise DataError(f"text file {path} has no texts")
    labels, classes = (None, []) if raw is None else _classes(raw, path)
    return tokenize(texts, inputs, tokenizer_folder), labels, classes


def text_groups(path: Path, spec: TextSpec) -> np.ndarray:
    """One group id per text row of `path`, in read_text's order: its document (.txt: paragraphs split by blank
    lines; .csv/.jsonl: the column `spec.document_column`)."""
    _, _, docs = _rows(path, spec, documents=True)
    return np.asarray(docs)


def tokenize(texts: list[str], inputs: list[InputSpec], tokenizer_folder: Path) -> dict[str, np.ndarray]:
    """The recipe's inputs (input_ids, attention_mask, token_type_ids, as named) for `texts`, padded and
    truncated to the first input's sequence length."""
    tok = tokenizer_for(tokenizer_folder)
    length = inputs[0].shape[1] if len(inputs[0].shape) > 1 else None
    if length:  # a 10 MB line is not tokenized whole to keep its first `length` tokens
        texts = [t[:length * CHARS_PER_TOKEN] for t in texts]
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    _check_known(tok, enc, tokenizer_folder)
    out = {}
    for s in inputs:
        if s.name not in enc:
            raise DataError(f"the tokenizer of {tokenizer_folder} gives {', '.join(enc)}; the recipe's input "
                            f"'{s.name}' is not one of them")
        out[s.name] = enc[s.name].astype(np.dtype(s.dtype))
    return out


def _check_known(tok: Any, enc: Any, folder: Path) -> None:
    """Refuse a tokenizer that maps most of the data's tokens to its unknown token: the model would be
    trained and judged on near-constant inputs (an empty or foreign vocabulary)."""
    unk = getattr(tok, "unk_token_id", None)
    if unk is None or "input_ids" not in enc:
        return  # byte-level vocabularies have no unknown token
    ids = np.asarray(enc["input_ids"])
    real = np.asarray(enc["attention_mask"]).astype(bool) if "attention_mask" in enc else np.ones(ids.shape, bool)
    special = [i for i in (getattr(tok, "all_special_ids", None) or []) if i != unk]
    real &= ~np.isin(ids, special)
    n = int(real.sum())
    if n == 0:
        raise DataError(f"the tokenizer of {folder} gives no tokens for the data's texts")
    share = float((ids[real] == unk).sum()) / n
    if share > MAX_UNKNOWN_SHARE:
        raise DataError(f"the tokenizer of {folder} maps {share:.0%} of the data's tokens to its unknown token "
                        f"{tok.unk_token!r} (vocabulary of {len(tok)}): it does not fit this text; check its "
                        "vocabulary files or name the model's own tokenizer with data.text.tokenizer")


def _folder_digest(folder: Path) -> str:
    """Every file's relative name and sha256, hashed together: the folder's content."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}:{sha256_file(f)}".encode())
    return h.hexdigest()


def read_datasets(path: Path, spec: DatasetsSpec, inputs: list[InputSpec], *, image: ImageSpec,
                  tokenizer_folder: Path | None, hf_folder: Path | None
                  ) -> tuple[dict[str, Any], np.ndarray | None, list[str]]:
    """A Hugging Face `datasets` folder (save_to_disk): one split's text column tokenized, image column
    decoded lazily (Arrow is memory-mapped: rows are read when taken) or named columns as arrays."""
    datasets = _need("datasets", "data.kind datasets", "datasets")
    if not path.is_dir():
        raise DataError(not_a_folder(path, "datasets folder"))
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError, KeyError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a folder written by datasets' save_to_disk: {why}") from e
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        split = spec.split or ("train" if "train" in loaded else names[0] if len(names) == 1 else None)
        if split not in loaded:
            raise DataError(f"{path} has splits {', '.join(names)}: "
                            + (f"no split '{split}'" if split else "give data.datasets.split"))
        ds = loaded[split]
    else:
        if spec.split:
            raise DataError(f"{path} holds one Dataset, not a DatasetDict: leave data.datasets.split out")
        ds, split = loaded, None
    cols = ds.column_names
    for c in (spec.text_column, spec.image_column, *spec.columns.values(), spec.label_column):
        if c is not None and c not in cols:
            raise DataError(f"{path}: no column '{c}' (columns: {', '.join(cols)})")
    if len(ds) == 0:
        raise DataError(f"{path}: the dataset{f' split {split}' if split else ''} has no rows")
    labels, classes = None, []
    if spec.label_column is not None:
        feature, raw = ds.features[spec.label_column], list(ds[spec.label_column])
        if isinstance(feature, datasets.ClassLabel):
            labels, classes = np.asarray(raw, np.int64), list(feature.names)
        else:
            labels, classes = _classes(raw, path)
    if spec.text_column is not None:
        if tokenizer_folder is None:
            raise RecipeError("data.datasets.text_column needs a tokenizer: data.text.tokenizer (a local folder) "
                              "or model.hf")
        return tokenize([str(t) for t in ds[spec.text_column]], inputs, tokenizer_folder), labels, classes
    if spec.image_column is not None:
        if len(inputs) != 1:
            raise RecipeError("data.datasets.image_column feeds a model with one input")
        if not isinstance(ds.features[spec.image_column], datasets.Image):
            raise DataError(f"{path}: column '{spec.image_column}' holds {type(ds.features[spec.image_column]).__name__}"
                            ", not images (datasets.Image)")
        sample, transform, settings = _image_transform(image, inputs[0], hf_folder)
        images = ds.select_columns([spec.image_column])
        fp = f"{_folder_digest(path)}:{split}:{spec.image_column}:{settings}"
        rows = _lazy_images(len(ds), lambda r: images[r][spec.image_column], sample, transform, fp, settings)
        return {inputs[0].name: rows}, labels, classes
    missing = [i.name for i in inputs if i.name not in spec.columns]
    if missing:
        raise RecipeError(f"data.datasets.columns names no column for input(s) {', '.join(missing)}")
    arrays = ds.with_format("numpy")
    return {name: np.asarray(arrays[col]) for name, col in spec.columns.items()}, labels, classes
