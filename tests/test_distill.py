"""Distillation vs the same pruned student trained on labels alone (same epochs, lr, seed)."""

import copy

import pytest
import torch

from edgebundle.core.modelio import load_structured
from edgebundle.stages.training import accuracy, distill, predict, train_supervised

MARGIN = 1.0  # points: distillation must beat or match the label-only student within this


def test_distillation_beats_or_matches_label_only_student(prepared):
    r = prepared.recipe
    pruned_art = next(a for a in prepared.lineage if a.stage == "prune")
    pruned = load_structured(r.model, r.base_dir, pruned_art.folder)
    ds, names, cfg = prepared.dataset, prepared.input_names, r.stages.distill
    cpu = torch.device("cpu")

    scratch = copy.deepcopy(pruned)
    train_supervised(scratch, ds.train, ds.val, names, cfg, seed=r.seed, device=cpu)
    acc_scratch = accuracy(predict(scratch, ds.test, names), ds.test.labels)

    student = prepared.load_student()
    acc_distilled = accuracy(predict(student, ds.test, names), ds.test.labels)
    assert acc_distilled >= acc_scratch - MARGIN, (acc_distilled, acc_scratch)


def test_distill_keeps_best_validation_checkpoint(prepared):
    m = next(a for a in prepared.lineage if a.stage == "distill").metrics
    assert m["best_val_accuracy"] == max(m["val_history"])
    student = prepared.load_student()
    ds = prepared.dataset
    assert accuracy(predict(student, ds.val, prepared.input_names), ds.val.labels) == m["best_val_accuracy"]


def test_distill_uses_teacher_soft_targets(prepared):
    """alpha=1 (KL only, no labels used) still teaches the student: the teacher's knowledge flows."""
    r = prepared.recipe
    pruned_art = next(a for a in prepared.lineage if a.stage == "prune")
    student = load_structured(r.model, r.base_dir, pruned_art.folder)
    ds = prepared.dataset
    before = accuracy(predict(student, ds.test, prepared.input_names), ds.test.labels)
    cfg = r.stages.distill.model_copy(update={"alpha": 1.0, "epochs": 5})
    distill(student, prepared.load_teacher(), ds.train, ds.val, prepared.input_names, cfg, seed=0,
            device=torch.device("cpu"))
    after = accuracy(predict(student, ds.test, prepared.input_names), ds.test.labels)
    assert after > 90.0 and after >= before


def _embedding_models(n_train: int, n_val: int):
    """A teacher and a narrower student with 24-wide embedding outputs, and random train / val inputs."""
    import numpy as np
    from torch import nn

    from edgebundle.core.data import Split

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 24)).eval()
    student = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 24))
    rng = np.random.default_rng(0)
    return (teacher, student, Split({"x": rng.standard_normal((n_train, 16)).astype(np.float32)}, None),
            Split({"x": rng.standard_normal((n_val, 16)).astype(np.float32)}, None))


def test_embeddings_distil_by_cosine_without_labels_and_keep_the_best_cosine_checkpoint():
    """A model whose output is an embedding (no classes, no labels): the loss is 1 - cosine to the teacher's
    output, the checkpoint kept is the one with the best mean cosine on the validation split."""
    import numpy as np

    from edgebundle.core.recipe import DistillStage
    from edgebundle.stages.training import distill_loss_for

    teacher, student, train, val = _embedding_models(512, 128)
    cfg = DistillStage(epochs=15, lr=0.01, batch_size=32)
    assert distill_loss_for(cfg, "cosine") == "cosine" and distill_loss_for(cfg, "snr") == "mse"
    assert distill_loss_for(cfg, "agreement") == "kl" and distill_loss_for(cfg.model_copy(update={"loss": "mse"}),
                                                                           "cosine") == "mse"

    def mean_cos(m):
        a, b = predict(m, val, ["x"]), predict(teacher, val, ["x"])
        return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    before = mean_cos(student)
    fit = distill(student, teacher, train, val, ["x"], cfg, seed=0, device=torch.device("cpu"), metric="cosine")
    assert fit.metric == "val_cosine" and len(fit.history) == 15
    assert fit.best_val_accuracy == max(fit.history)
    assert abs(mean_cos(student) - fit.best_val_accuracy) < 1e-5
    assert before < 0.5 < 0.9 < fit.best_val_accuracy


def test_patience_stops_after_epochs_without_a_better_score_and_keeps_the_best():
    """A validation score that peaks at epoch 3 of 30: patience 2 stops after epoch 5, the best checkpoint is
    the one kept, every epoch is reported (core.progress), and the stage's config key leaves patience out
    while it is unset (work folders prepared before it stay valid)."""
    import numpy as np
    from torch import nn

    from edgebundle.core import progress
    from edgebundle.core.data import Split
    from edgebundle.core.recipe import DistillStage
    from edgebundle.stages.base import without_defaults
    from edgebundle.stages.training import _fit

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    rng = np.random.default_rng(0)
    train = Split({"x": rng.standard_normal((32, 4)).astype(np.float32)}, rng.integers(0, 3, 32))
    scores = iter([1.0, 2.0, 3.0, 2.5, 2.9, 5.0] + [0.0] * 30)
    weights = []

    def score(m):
        weights.append(m.weight.detach().clone())
        return next(scores)

    seen = []
    with progress.listening(lambda kind, **info: seen.append((kind, info["epoch"], info["epochs"], info["best"]))):
        fit = _fit(model, train, train, ["x"], epochs=30, lr=0.01, batch_size=8, weight_decay=0.0, seed=0,
                   loss_fn=lambda out, b, y, i: nn.functional.cross_entropy(out, y), device=torch.device("cpu"),
                   score=("val_score", score), patience=2)
    assert fit.epochs == 5 and fit.history == [1.0, 2.0, 3.0, 2.5, 2.9] and fit.best_epoch == 2
    assert torch.equal(model.weight, weights[2])
    assert seen == [("epoch", e, 30, b) for e, b in zip(range(1, 6), (1.0, 2.0, 3.0, 3.0, 3.0))]
    assert "patience" not in without_defaults(DistillStage(), "patience")
    assert without_defaults(DistillStage(patience=3), "patience")["patience"] == 3


def test_batchnorm_statistics_stay_frozen_and_a_student_is_never_returned_worse_than_it_started(prepared):
    """batchnorm frozen (auto's choice for a teacher that came with its weights): the running statistics the
    student came with are kept while it learns (train, auto's choice where the recipe trained the teacher:
    updated from the batches). And the weights distillation started from are a checkpoint: an lr that
    only makes things worse returns the starting student (best_epoch -1)."""
    r = prepared.recipe
    ds, names = prepared.dataset, prepared.input_names
    cpu = torch.device("cpu")

    def stats(m):
        return [b.running_mean.clone() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]

    from edgebundle.core.modelio import example_inputs
    from edgebundle.stages.pruning import prune

    for mode in ("frozen", "train"):
        # pruned without re-centring its BatchNorm statistics, not distilled yet: an epoch helps (re-centred,
        # this student starts better than an epoch takes it)
        student = prepared.load_teacher()
        prune(student, r.stages.prune.model_copy(update={"recenter": False}), example_inputs(r.inputs),
              train=ds.train, names=names)
        before = stats(student)
        cfg = r.stages.distill.model_copy(update={"epochs": 1, "batchnorm": mode})
        fit = distill(student, prepared.load_teacher(), ds.train, ds.val, names, cfg, seed=0, device=cpu)
        assert fit.best_epoch == 0, mode
        same = all(torch.equal(a, b) for a, b in zip(before, stats(student)))
        assert same == (mode == "frozen"), mode

    student = prepared.load_student()
    start = accuracy(predict(student, ds.val, names), ds.val.labels)
    cfg = r.stages.distill.model_copy(update={"epochs": 2, "lr": 50.0})
    fit = distill(student, prepared.load_teacher(), ds.train, ds.val, names, cfg, seed=0, device=cpu)
    assert max(fit.history) < start and fit.best_epoch == -1 and fit.best_val_accuracy == start
    assert accuracy(predict(student, ds.val, names), ds.val.labels) == start


def test_a_pretrained_teachers_student_learns_without_dropout_and_batchnorm_follows_its_setting():
    """dropout auto: off where the teacher came with its weights (all-MiniLM-L6-v2 refitted after pruning lost
    validation cosine to every epoch with dropout, gained without), on where the recipe trained it."""
    from edgebundle.core.recipe import DistillStage
    from edgebundle.stages.training import _train_mode, dropout_off

    assert dropout_off(DistillStage(), pretrained=True) and not dropout_off(DistillStage(), pretrained=False)
    assert dropout_off(DistillStage(dropout="off"), pretrained=False)
    assert not dropout_off(DistillStage(dropout="on"), pretrained=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    for freeze_bn in (False, True):
        _train_mode(model, freeze_bn, no_dropout=True)
        assert not model[2].training and model[1].training is not freeze_bn
        _train_mode(model, freeze_bn)
        assert model[2].training and model[1].training is not freeze_bn


def test_agreement_chooses_checkpoints_on_the_inputs_the_budget_judges():
    """With the recipe's min_confidence, distillation's validation agreement counts only the inputs the teacher
    is that confident on, as the agreement budget does; without, every input."""
    import numpy as np

    from edgebundle.stages.training import agreement

    reference = np.array([[9, 0, 0], [0, 9, 0], [0.1, 0, 0], [0, 0.1, 0]], dtype=np.float32)  # 2 confident
    outputs = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=np.float32)  # agrees on those 2
    assert agreement(outputs, reference) == 50.0
    assert agreement(outputs, reference, 0.5) == 100.0
    assert agreement(outputs, reference, 0.9999) == 50.0  # no confident input: every input


def test_with_views_and_hidden_matching_the_teacher_answers_each_batch_once():
    """Augmented views are answered by the teacher as they come; hidden-state matching reads its layers from that
    same forward pass (not a second one), so an epoch costs one teacher pass per batch plus validation's."""
    import numpy as np

    from edgebundle.core.data import Split
    from edgebundle.core.recipe import DistillStage, InputSpec

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8)])
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x):
            for b in self.blocks:
                x = torch.relu(b(x))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    teacher = Net().eval()
    student = copy.deepcopy(teacher)
    rng = np.random.default_rng(0)
    train = Split({"image": rng.standard_normal((64, 3, 16, 16)).astype(np.float32)}, None)
    val = Split({"image": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}, None)
    calls = []
    teacher.register_forward_hook(lambda _m, a, _o: calls.append(len(a[0])))
    cfg = DistillStage(epochs=1, lr=1e-4, batch_size=16, hidden_weight=1.0, loss="mse", augment="auto")
    specs = [InputSpec(name="image", shape=[1, 3, 16, 16])]
    distill(student, teacher, train, val, ["image"], cfg, seed=0, device=torch.device("cpu"), specs=specs)
    # the widths probe (2 rows), validation's reference (8 rows), one pass per training batch of 16
    assert sorted(calls) == [2, 8, 16, 16, 16, 16], calls


def test_with_a_cosine_budget_checkpoints_are_chosen_by_its_margin_not_by_the_mean_alone():
    """The budget judges the mean and the worst input: a checkpoint that raises the mean and lowers the minimum
    is not better where the minimum binds. Distillation chooses by the smaller of the two margins."""
    import numpy as np

    from edgebundle.core.metrics import MetricSpec
    from edgebundle.core.recipe import DistillStage
    from edgebundle.stages.training import cosine_margin

    spec = MetricSpec(name="cosine", min_cosine=0.9, min_mean_cosine=0.98)
    ref = np.eye(4, dtype=np.float32)
    near = ref + 0.1 * np.roll(ref, 1, axis=1)  # every input at cosine 0.995
    one_off = ref.copy()
    one_off[3] = [0, 0, 1, 1]  # mean 0.927, one input at 0.707: the mean's margin is the smaller, then the min's
    assert cosine_margin(near, ref, spec) == pytest.approx(0.995 - 0.98, abs=1e-3)
    assert cosine_margin(one_off, ref, spec) == pytest.approx(0.707 - 0.9, abs=1e-3)
    spec_mean = spec.model_copy(update={"min_cosine": 0.5})
    assert cosine_margin(one_off, ref, spec_mean) == pytest.approx(0.927 - 0.98, abs=1e-3)

    teacher, student, train, val = _embedding_models(256, 64)
    fit = distill(student, teacher, train, val, ["x"], DistillStage(epochs=6, lr=0.01, batch_size=32), seed=0,
                  device=torch.device("cpu"), metric="cosine", budget=spec)
    assert fit.metric == "val_cosine_margin" and fit.best_val_accuracy == max(fit.history)
    assert fit.best_val_accuracy == pytest.approx(cosine_margin(predict(student, val, ["x"]),
                                                                predict(teacher, val, ["x"]), spec), abs=1e-6)
