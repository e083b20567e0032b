"""Padded text batches cut to their longest real sequence while a model trains (stages.padding)."""

import numpy as np
import torch
from torch import nn

from edgebundle.core.data import Split
from edgebundle.core.recipe import DistillStage, TrainStage
from edgebundle.stages.padding import Trim, grouped
from edgebundle.stages.training import distill, predict, train_supervised

SEQ = 32
NAMES = ["input_ids", "attention_mask"]


class Text(nn.Module):
    """Embeddings, one attention layer with a key padding mask, mean pooling: over the real tokens, or (reads
    padding) over every position."""

    def __init__(self, reads_padding: bool | int = False, width: int = 16) -> None:
        super().__init__()
        self.reads_padding = reads_padding  # an int: only rows of at least that many real tokens
        self.emb, self.pos = nn.Embedding(50, width), nn.Embedding(SEQ, width)
        self.att = nn.MultiheadAttention(width, 2, batch_first=True)
        self.out = nn.Linear(width, 8)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        h = h + self.att(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)[0]
        m = attention_mask.unsqueeze(-1).float()
        honest = (h * m).sum(1) / m.sum(1).clamp(min=1)
        if self.reads_padding is True:
            return self.out(h.mean(1))
        if self.reads_padding:
            long = attention_mask.sum(1, keepdim=True) >= self.reads_padding
            return self.out(torch.where(long, h.mean(1), honest))
        return self.out(honest)


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, SEQ // 2, n)
    lengths[: n // 16] = SEQ  # a few long sentences: one in a random batch sets its length
    ids = np.zeros((n, SEQ), np.int64)
    mask = np.zeros((n, SEQ), np.int64)
    for i, k in enumerate(lengths):
        ids[i, :k], mask[i, :k] = rng.integers(1, 50, k), 1
    return Split({"input_ids": ids, "attention_mask": mask}, None)


def _seen(model: nn.Module) -> list[int]:
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[1]) if torch.is_grad_enabled() else None)
    return seen


def test_a_model_that_honours_its_mask_trains_on_batches_cut_to_their_longest_sentence():
    torch.manual_seed(0)
    teacher, train, val = Text().eval(), _split(256, 0), _split(32, 1)
    student = Text()
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        student.out.weight.add_(0.3 * torch.randn_like(student.out.weight))
    trim = Trim.checked([teacher, student], train, NAMES, torch.device("cpu"))
    assert trim == Trim(mask=1, seq=(0, 1))
    seen = _seen(student)
    cfg = DistillStage(epochs=2, lr=3e-3, batch_size=16, loss="mse")
    fit = distill(student, teacher, train, val, NAMES, cfg, seed=0, device=torch.device("cpu"), metric="snr")
    assert fit.best_epoch >= 0  # an epoch closer to the teacher than the start
    # batches of similar length, each cut after its longest: most of them far shorter than the padded 32
    assert len(seen) == 2 * 16 and max(seen) == SEQ
    assert np.mean(seen) < 0.6 * SEQ, seen
    # what the student learned holds on full-length inputs, as the bundle will see them
    full = predict(student, val, NAMES)
    cut = [np.asarray(student.eval()(*trim.cut([torch.from_numpy(val.inputs[n][i:i + 1]) for n in NAMES])).detach())
           for i in range(len(val))]
    np.testing.assert_allclose(full, np.concatenate(cut), atol=1e-5)


def test_a_model_that_reads_its_padding_keeps_full_length_batches():
    torch.manual_seed(0)
    teacher, train, val = Text(reads_padding=True).eval(), _split(64, 0), _split(16, 1)
    student = Text(reads_padding=True)
    assert Trim.find(train, NAMES) is not None
    assert Trim.checked([teacher, student], train, NAMES, torch.device("cpu")) is None
    seen = _seen(student)
    distill(student, teacher, train, val, NAMES, DistillStage(epochs=1, lr=1e-3, batch_size=16, loss="mse"),
            seed=0, device=torch.device("cpu"), metric="snr")
    assert seen == [SEQ] * 4
    # inputs without an attention mask are never cut
    assert Trim.find(Split({"x": np.zeros((8, 4), np.float32)}, None), ["x"]) is None


def test_a_model_that_reads_padding_only_on_longer_inputs_keeps_full_length_batches():
    torch.manual_seed(0)
    model, train = Text(reads_padding=9).eval(), _split(64, 0)
    trim = Trim.find(train, NAMES)
    shortest = np.argsort(trim.lengths(train, NAMES), kind="stable")[:4]
    xs = [torch.from_numpy(train.inputs[n][shortest]) for n in NAMES]
    with torch.no_grad():  # the shortest inputs alone would pass the model as cuttable
        torch.testing.assert_close(model(*xs), model(*trim.cut(xs)))
    assert Trim.checked([model], train, NAMES, torch.device("cpu")) is None
    assert Trim.checked([Text().eval()], train, NAMES, torch.device("cpu")) == trim


def test_a_teacher_trained_on_text_learns_from_batches_grouped_by_length_unless_told_otherwise():
    train, val = _split(256, 0), _split(32, 1)
    labelled = [Split(s.inputs, (s.inputs["attention_mask"].sum(1) > 8).astype(np.int64)) for s in (train, val)]
    mean_length = {}
    for by_length in (True, False):
        torch.manual_seed(0)
        model = Text()
        seen = _seen(model)
        train_supervised(model, *labelled, NAMES, TrainStage(epochs=1, batch_size=16, group_by_length=by_length),
                         seed=0, device=torch.device("cpu"))
        assert len(seen) == 16
        mean_length[by_length] = np.mean(seen)
    # at random, a long sentence sets most batches' length; grouped, most batches are short
    assert mean_length[True] < 0.6 * mean_length[False], mean_length


def test_batches_grouped_by_length_cover_every_input_once_with_similar_lengths():
    lengths = np.random.default_rng(0).integers(1, 64, 4000)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=gen)
    plan = grouped(order, lengths, 32, gen)
    assert sorted(torch.cat(plan).tolist()) == list(range(len(lengths)))
    spread = np.mean([np.ptp(lengths[b.numpy()]) for b in plan])
    at_random = np.mean([np.ptp(lengths[order[i:i + 32].numpy()]) for i in range(0, len(order), 32)])
    assert spread < 0.1 * at_random, (spread, at_random)
    # not sorted overall: consecutive batches come from anywhere in the length range
    firsts = [int(lengths[b[0]]) for b in plan[:20]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_the_teacher_cache_key_says_how_text_batches_are_drawn(tmp_path):
    from types import SimpleNamespace

    from conftest import make_recipe
    from edgebundle.stages.teacher import Teacher

    text = [{"name": n, "shape": [1, SEQ], "dtype": "int64"} for n in NAMES]
    keys = {}
    for label, inputs, grouped_ in (("image", None, True), ("text", text, True), ("text, at random", text, False)):
        over = {"stages__train": {"enabled": True, "group_by_length": grouped_}}
        recipe = make_recipe(tmp_path, **over, **({"inputs": inputs} if inputs else {}))
        keys[label] = Teacher().config(SimpleNamespace(recipe=recipe))
    assert "batches" not in keys["image"] and "group_by_length" not in keys["image"]["train"]
    assert keys["text"]["batches"] == "cut where lossless, grouped by length"
    assert keys["text, at random"]["batches"] == "cut where lossless"
