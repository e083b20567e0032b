import copy

import pytest
import torch

import factories
from edgebundle.core.errors import RecipeError
from edgebundle.core.modelio import example_inputs
from edgebundle.stages.pruning import count, prune
from edgebundle.core.recipe import InputSpec, PruneStage

SPECS = [InputSpec(name="image", shape=[1, 1, 8, 8], dynamic_axes={0: "batch"})]
EXAMPLE = example_inputs(SPECS)


@pytest.mark.parametrize("factory", [factories.tiny_cnn, factories.depthwise_separable, factories.residual])
@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_pruning_shrinks_tensors_and_keeps_model_runnable(factory, importance, prepared):
    torch.manual_seed(0)
    model = factory().eval()
    before_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rep = prune(model, PruneStage(importance=importance, ratio=0.5), EXAMPLE,
                train=prepared.dataset.train, names=["image"])
    assert rep.macs_after < 0.6 * rep.macs_before
    assert rep.params_after < rep.params_before
    after_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert any(after_shapes[k] != before_shapes[k] for k in before_shapes), "shapes must really shrink"
    out = model(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10)
    assert (rep.macs_after, rep.params_after) == count(model, EXAMPLE)


def test_output_layer_and_ignored_layers_keep_their_width():
    model = factories.tiny_cnn().eval()
    rep = prune(model, PruneStage(ratio=0.5, ignore=["features.0.0"]), EXAMPLE, train=None, names=["image"])
    assert model.classifier.out_features == 10
    assert model.features[0][0].out_channels == 8
    assert "classifier" in rep.ignored and "features.0.0" in rep.ignored
    assert model.features[1][0].out_channels == 8  # 16 -> 8: pruned


def test_unknown_ignored_layer_is_an_error():
    with pytest.raises(RecipeError, match="no module named nope"):
        prune(factories.tiny_cnn(), PruneStage(ignore=["nope"]), EXAMPLE, train=None, names=["image"])


def test_prune_stage_leaves_its_input_artifact_untouched(prepared):
    teacher = prepared.teacher
    from edgebundle.core.artifact import sha256_file

    assert all(sha256_file(teacher.path(n)) == h for n, h in teacher.files.items())
    t = prepared.load_teacher()
    s = prepared.load_student()
    assert t.features[0][0].out_channels == 32
    assert s.features[0][0].out_channels == 16


def test_round_to_auto_keeps_simd_friendly_widths():
    """auto rounds to multiples of 16 where every layer keeps >= 16 channels, of 8 where every one keeps >= 8,
    and never empties a tiny layer."""
    import edgebundle.zoo as zoo

    torch.manual_seed(0)
    model = zoo.digits_cnn(width=40).eval()  # 40 * (1 - 0.3) = 28: not a multiple of 16
    rep = prune(model, PruneStage(ratio=0.3), EXAMPLE, train=None, names=["image"])
    assert rep.round_to == 16
    assert all(after % 16 == 0 for name, (before, after) in rep.layers.items() if name not in rep.ignored)
    model = zoo.digits_cnn(width=24).eval()  # 24 * (1 - 0.5) = 12: at least 8, under 16
    rep = prune(model, PruneStage(ratio=0.5), EXAMPLE, train=None, names=["image"])
    assert rep.round_to == 8
    assert all(after % 8 == 0 for name, (before, after) in rep.layers.items() if name not in rep.ignored)
    tiny = factories.tiny_cnn().eval()  # 8-channel layers: 4 after pruning, so no rounding
    rep = prune(tiny, PruneStage(ratio=0.5), EXAMPLE, train=None, names=["image"])
    assert rep.round_to is None and tiny.features[1][0].out_channels == 8


class _FixedScale(torch.nn.Module):
    """A width Torch-Pruning cannot see: a plain buffer of 32 scales."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(32))

    def forward(self, x):
        return x * self.scale


def test_a_layer_pruning_breaks_is_one_line_naming_it():
    from edgebundle.core.errors import StageError

    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), _FixedScale(), torch.nn.Linear(32, 4))
    with pytest.raises(StageError) as e:
        prune(model, PruneStage(ratio=0.5), (torch.zeros(1, 8),), train=None, names=["x"])
    msg = str(e.value)
    assert "\n" not in msg and "no longer runs: layer '2' (_FixedScale)" in msg and "stages.prune.ignore" in msg


def test_an_encoder_whose_output_is_its_hidden_state_keeps_that_width():
    """Sentence-embedding style: the output is the pooled residual stream, so every residual writer is
    protected; heads and MLP channels are pruned, the embedding keeps its width."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from edgebundle.core.hf import FeatureExtractor

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    model = FeatureExtractor(transformers.BertModel(cfg, add_pooling_layer=True).eval(), normalize=True)
    ex = (torch.randint(3, 40, (1, 16)), torch.ones(1, 16, dtype=torch.int64))
    rep = prune(model, PruneStage(ratio=0.25, head_ratio=0.5), ex, train=None, names=["input_ids", "attention_mask"])
    assert model(*ex).shape == (1, 64)
    assert all(v == [4, 2] for v in rep.heads.values())
    changed = {k: v for k, v in rep.layers.items() if v[0] != v[1]}
    assert {k.rsplit(".", 1)[-1] for k in changed} == {"query", "key", "value", "dense"}
    assert all("intermediate" in k or "attention.self" in k for k in changed)
    assert rep.layers["model.encoder.layer.0.intermediate.dense"] == [128, 96]
    assert rep.params_after < rep.params_before


def test_distilbert_heads_and_mlp_are_pruned_and_mpnet_heads_are_refused_in_one_line():
    """DistilBERT's attention (q_lin/k_lin/v_lin, n_heads) loses whole heads consistently; MPNet shares one
    relative-position bias over every layer's heads, so head pruning is refused with one line."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from edgebundle.core.errors import RecipeError
    from edgebundle.core.hf import FeatureExtractor

    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=40, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                        max_position_embeddings=32)
    model = FeatureExtractor(transformers.DistilBertModel(cfg).eval(), normalize=True).eval()
    ex = (torch.randint(3, 40, (1, 16)), torch.ones(1, 16, dtype=torch.int64))
    rep = prune(model, PruneStage(ratio=0.25, head_ratio=0.5), ex, train=None, names=["input_ids", "attention_mask"])
    assert all(v == [4, 2] for v in rep.heads.values()) and len(rep.heads) == 2
    attn = model.model.transformer.layer[0].attention
    assert attn.n_heads == 2 and attn.q_lin.out_features == attn.out_lin.in_features == 32
    assert rep.layers["model.transformer.layer.0.ffn.lin1"] == [128, 96]
    with torch.no_grad():  # other batch sizes and lengths, with padding: the reshapes follow the new widths
        mask = torch.ones(3, 10, dtype=torch.int64)
        mask[1, 6:] = 0
        out = model(torch.randint(3, 40, (3, 10)), mask)
    assert out.shape == (3, 64) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-4)

    mp = transformers.MPNetConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)
    mpnet = FeatureExtractor(transformers.MPNetModel(mp, add_pooling_layer=False).eval()).eval()
    with pytest.raises(RecipeError) as e:
        prune(mpnet, PruneStage(ratio=0.25, head_ratio=0.5), ex, train=None, names=["input_ids", "attention_mask"])
    assert "\n" not in str(e.value) and "MPNet" in str(e.value)


class _Hidden(torch.nn.Module):
    """An MLP whose hidden units carry a large mean (positive biases before the ReLU), a quarter of them constant:
    what pruning a ReLU6 network's channels without compensation throws away."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(32, 64, generator=g) * 0.3)
            self.fc1.weight[::4] = 0.0  # units 0, 4, 8, ...: constant ReLU(bias)
            self.fc1.bias.copy_(2.0 + torch.rand(32, generator=g))
            self.fc2.weight.copy_(torch.randn(10, 32, generator=g))
            self.fc2.bias.zero_()

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _train_split(n: int = 256):
    import numpy as np

    from edgebundle.core.data import Split

    return Split({"image": np.random.default_rng(1).standard_normal((n, 1, 8, 8)).astype(np.float32)}, None)


def test_compensation_keeps_the_mean_output_of_the_layers_that_read_pruned_channels():
    """A removed unit's mean on the training inputs goes into the bias of the layer that read it: the next layer's
    mean output is kept exactly (it is linear), where plain removal shifts it."""
    train = _train_split()
    x = torch.from_numpy(train.inputs["image"])
    ref = _Hidden().eval()(x).detach().mean(0)
    shifts = {}
    for comp in ("none", "mean", "least_squares"):
        model = _Hidden().eval()
        prune(model, PruneStage(ratio=0.5, round_to=None, compensate=comp), EXAMPLE, train=train, names=["image"])
        assert model.fc1.out_features == 16
        shifts[comp] = float((model(x).detach().mean(0) - ref).abs().max())
    assert max(shifts["mean"], shifts["least_squares"]) < 1e-3 < shifts["none"] / 100, shifts


def test_least_squares_refits_the_reader_so_kept_channels_carry_what_correlated_removed_ones_did():
    """Half the hidden units are copies of the other half at a quarter of the weight (ReLU keeps the factor):
    activation importance removes the copies (and the constant units). Mean compensation keeps only their average; the least-squares refit of the layer that
    reads them gives their share to the units they copy, so outputs on other inputs stay (up to the ridge)."""
    train = _train_split()
    x = torch.from_numpy(_train_split(64).inputs["image"] * 2)  # other inputs than those measured
    errors = {}
    for comp in ("mean", "least_squares"):
        model = _Hidden().eval()
        with torch.no_grad():
            model.fc1.weight[:16] = model.fc1.weight[16:] / 4
            model.fc1.bias[:16] = model.fc1.bias[16:] / 4
            model.fc2.weight[:, :16] = model.fc2.weight[:, 16:]
        ref = model(x).detach()
        prune(model, PruneStage(ratio=0.5, round_to=None, importance="activation", compensate=comp), EXAMPLE,
              train=train, names=["image"])
        assert model.fc1.out_features == 16
        errors[comp] = float((model(x).detach() - ref).abs().max() / ref.abs().max())
    assert errors["least_squares"] < 0.01 < errors["mean"], errors
    # recipes written when compensate was a switch keep their meaning
    assert PruneStage(compensate=True).compensate == "mean" and PruneStage(compensate=False).compensate == "none"


def test_activation_importance_removes_what_contributes_least_and_nothing_is_lost():
    """activation importance ranks a unit by its spread on training inputs times the reader's weights on it: the
    constant units go first, and compensated, the pruned model computes the same outputs on every input."""
    train = _train_split()
    x = torch.from_numpy(_train_split(64).inputs["image"] * 2)  # other inputs than those measured
    ref = _Hidden().eval()(x).detach()
    model = _Hidden().eval()
    prune(model, PruneStage(ratio=0.25, round_to=None, importance="activation"), EXAMPLE, train=train,
          names=["image"])
    assert model.fc1.out_features == 24 and bool((model.fc1.weight.abs().sum(1) > 0).all())  # constants gone
    assert float((model(x).detach() - ref).abs().max()) < 1e-4
    with pytest.raises(RecipeError, match="activation"):
        prune(_Hidden(), PruneStage(ratio=0.25, importance="activation"), EXAMPLE, train=None, names=["image"])


def test_shared_false_keeps_the_channels_several_layers_read():
    """The residual model's stream (read by the body and the head) keeps its width with shared: false; the body's
    hidden channels (read by one conv) are pruned."""
    model = factories.residual().eval()
    prune(model, PruneStage(ratio=0.5, shared=False), EXAMPLE, train=_train_split(), names=["image"])
    assert model.stem[0].out_channels == 16 and model.body[3].out_channels == 16
    assert model.body[0].out_channels == 8
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


class _WideHidden(torch.nn.Module):
    """A residual block whose 8-channel stream every layer reads and whose 64 hidden channels one conv reads, with
    BatchNorm statistics that are not the identity (as a pretrained model's are)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 64, 1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                                        torch.nn.Conv2d(64, 8, 1), torch.nn.BatchNorm2d(8))
        self.head = torch.nn.Linear(8, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.body(h)).mean((2, 3)))


def test_round_to_auto_with_shared_false_looks_at_the_layers_it_prunes():
    """The 8-channel stream would keep 5 channels if it were pruned (no rounding); with shared: false only the
    64 hidden channels are, so auto rounds them to 16."""
    rep = prune(_WideHidden().eval(), PruneStage(ratio=0.3), EXAMPLE, train=_train_split(), names=["image"])
    assert rep.round_to is None
    model = _WideHidden().eval()
    rep = prune(model, PruneStage(ratio=0.3, shared=False), EXAMPLE, train=_train_split(), names=["image"])
    assert rep.round_to == 16
    assert model.body[0].out_channels < 64 and model.body[0].out_channels % 16 == 0
    assert model.stem[0].out_channels == 8


def test_recentring_keeps_the_moments_of_the_batchnorms_after_pruned_channels():
    """Pruning half the hidden channels moves the input of the stream's BatchNorm; re-centred, that BatchNorm's
    output keeps the original model's per-channel mean and variance on the training inputs (its statistics are
    the original ones, shifted and scaled), where without it they move. The hidden BatchNorm keeps the original
    statistics of the channels it kept."""
    train = _train_split()
    x = torch.from_numpy(train.inputs["image"][:128])

    def moments(model):
        out = {}
        h = model.body[4].register_forward_hook(lambda m, a, o: out.update(mu=o.mean((0, 2, 3)), v=o.var((0, 2, 3))))
        with torch.no_grad():
            model(x)
        h.remove()
        return out["mu"], out["v"]

    mu0, v0 = moments(_WideHidden().eval())
    err = {}
    for rec in (False, True):
        model = _WideHidden().eval()
        rep = prune(model, PruneStage(ratio=0.5, shared=False, round_to=None, compensate=False, recenter=rec,
                                      importance="activation"), EXAMPLE, train=train, names=["image"])
        assert model.body[0].out_channels == 32 and rep.recentred == (3 if rec else 0)
        mu, v = moments(model)
        err[rec] = float(max((mu - mu0).abs().max(), ((v / v0) - 1).abs().max()))
    assert err[True] < 0.02 < err[False] / 10, err  # (variance: up to BatchNorm's eps)


def test_a_bare_parameter_is_a_note_not_a_third_party_warning():
    """Torch-Pruning warns on stderr about parameters outside any layer it knows (a bare per-channel scale) and
    cuts them along their last dimension longer than 1; the run says so in one progress note instead."""
    import warnings

    from edgebundle.core import progress

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.scale = torch.nn.Parameter(torch.ones(1, 16, 1, 1))
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x):
            return self.head((self.conv(x) * self.scale).mean((2, 3)))

    model = Scaled().eval()
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning left on the way out fails the test
        with progress.listening(lambda kind, **info: notes.append(info.get("text", ""))):
            prune(model, PruneStage(ratio=0.5, round_to=None), (torch.zeros(1, 1, 8, 8),), train=None, names=["x"])
    assert model.conv.out_channels == model.scale.shape[1] < 16
    assert len([n for n in notes if "parameters outside any layer ('scale')" in n]) == 1, notes
