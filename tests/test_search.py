"""prune ratio auto: the structure is searched by measurement (stage `search`), and depth pruning drops whole
blocks of an encoder. The search prices each candidate on the first target (int8, validation split, against
the original model, timed interleaved against the unpruned int8 model)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import default_dict, prepared_copy
from edgebundle.core.errors import RecipeError
from edgebundle.core.recipe import ModelSpec, PruneStage, load_recipe, recipe_from_dict
from edgebundle.pipeline.runner import run


def _search_recipe(**prune) -> dict:
    return {"prune": {"enabled": True, "ratio": "auto", "search_epochs": 2, **prune}}


def _stages(**prune) -> dict:
    st = copy.deepcopy(default_dict()["stages"])
    st.update(_search_recipe(**prune))
    return st


def _ort_only() -> list[dict]:
    return [{"name": "ort-cpu", "options": {"precision": "int8"}, "measure": {"iterations": 50}}]


def test_the_search_keeps_a_structure_that_holds_and_refuses_one_that_does_not(default_run, tmp_path):
    path, work = prepared_copy(default_run, tmp_path, stages=_stages(search_ratios=[0.25, 0.8, 0.9]),
                               targets=_ort_only())
    res = run(load_recipe(path), output=tmp_path / "out", work=work)
    bundle = res.bundles[0]
    search = bundle.manifest["search"]
    rows = {r["label"]: r for r in search["rows"]}
    assert search["target"] == "ort-cpu" and search["reference"] == "original"
    assert rows["unpruned"]["within"]
    assert rows["ratio 0.25"]["within"] and rows["ratio 0.25"]["macs_ratio"] < 0.7
    assert not rows["ratio 0.8"]["within"] and rows["ratio 0.8"]["status"] == "over budget"
    # its fp32 student already misses the budget: no int8 build spends minutes on it (nothing timed)
    assert rows["ratio 0.8"]["fp32_over"] and "speedup" not in rows["ratio 0.8"]
    assert "speedup" in rows["ratio 0.25"]
    # a pruned start over budget is distilled (and says which epoch it kept, -1: the start); one that holds is not
    assert rows["ratio 0.8"]["distill_best_epoch"] >= -1 and "start_held" not in rows["ratio 0.8"]
    assert "ratio 0.9" not in rows  # a family stops at its first candidate over budget
    assert "ratio 0.25, importance fpgm" in rows  # the channels FPGM picks: a family of its own
    assert search["chosen"]["ratio"] in (0.0, 0.25)  # 0.25 when its speed-up is resolved, else unpruned
    assert bundle.manifest["accuracy"]["reference"] == "original"
    prune = next(a for a in res.prepared.lineage if a.stage == "prune")
    assert prune.config["prune"]["ratio"] == search["chosen"]["ratio"]
    assert "Structure search" in (tmp_path / "out" / "report.html").read_text()

    # an interrupted search resumes: the rows kept in the work folder are not priced again
    rows_files = list((work / "search").glob("*.jsonl"))
    assert len(rows_files) == 1
    for art in work.glob("search-*"):
        import shutil

        shutil.rmtree(art)
    again = run(load_recipe(path), output=tmp_path / "out2", work=work).bundles[0].manifest["search"]
    assert [r.get("p50_ms") for r in again["rows"]] == [r.get("p50_ms") for r in search["rows"]]


def test_a_pruned_start_that_holds_the_budget_is_not_distilled_by_the_search(default_run, tmp_path, monkeypatch):
    """The search prices each pruned start first: one within budget keeps that verdict without its short
    distillation (the kept one gets the full distillation after); one over budget is distilled and priced again."""
    from edgebundle.stages import search

    learned = []
    real = search.distill
    monkeypatch.setattr(search, "distill", lambda student, *a, **k: learned.append(1) or real(student, *a, **k))
    loose = [dict(_ort_only()[0], max_accuracy_drop=50.0)]  # a budget any quarter-pruned start holds
    path, work = prepared_copy(default_run, tmp_path, stages=_stages(search_ratios=[0.25]), targets=loose)
    rows = {r["label"]: r for r in run(load_recipe(path), output=tmp_path / "out", work=work)
            .bundles[0].manifest["search"]["rows"]}
    assert rows["ratio 0.25"]["start_held"] and rows["ratio 0.25"]["within"]
    assert "distill_best_epoch" not in rows["ratio 0.25"] and "speedup" in rows["ratio 0.25"]
    assert "pruned start held the budget: not distilled" in search._row_text(rows["ratio 0.25"])
    # FPGM's quarter, the other family, held as well: nothing was distilled
    assert rows["ratio 0.25, importance fpgm"]["start_held"] and not learned


def test_a_search_out_of_time_ships_the_unpruned_model_and_says_so(default_run, tmp_path):
    path, work = prepared_copy(default_run, tmp_path, stages=_stages(search_minutes=0.0001), targets=_ort_only())
    res = run(load_recipe(path), output=tmp_path / "out", work=work)
    search = res.bundles[0].manifest["search"]
    assert search["chosen_label"] == "unpruned"
    assert all(r["status"] == "not tried" for r in search["rows"][1:])
    assert any("search_minutes ran out); the unpruned model is kept" in n for n in res.bundles[0].manifest["notes"])
    prune = next(a for a in res.prepared.lineage if a.stage == "prune")
    distill = next(a for a in res.prepared.lineage if a.stage == "distill")
    assert prune.metrics["unchanged"] and "skipped" in distill.metrics
    teacher, student = res.prepared.load_teacher(), res.prepared.load_student()
    for (n, a), (_, b) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(a, b), n


def test_depth_pruning_drops_whole_encoder_blocks_and_the_model_reloads(tmp_path):
    from edgebundle.core.modelio import load_structured, save_structured
    from edgebundle.stages.depth import block_list, kept_blocks
    from edgebundle.stages.pruning import prune
    from edgebundle.stages.search import Candidate, depth_ratios, families
    from edgebundle.zoo import tiny_encoder

    assert kept_blocks(6, 0.5) == [0, 2, 5] and kept_blocks(6, 0.33) == [0, 2, 3, 5] and kept_blocks(2, 0.5) == [1]
    model = tiny_encoder(layers=4)
    ex = (torch.zeros(1, 32, dtype=torch.long),)
    assert block_list(model, ex) == ("layers", 4, (0, 1, 2, 3))
    labels = [[c.label for c in f] for f in families(PruneStage(ratio="auto", search_ratios=[0.2, 0.4]), model, ex)]
    assert labels == [["ratio 0.2", "ratio 0.4"], ["ratio 0.2, importance fpgm", "ratio 0.4, importance fpgm"],
                      ["head ratio 0.25", "head ratio 0.5"], ["depth ratio 0.33", "depth ratio 0.5"]]
    default = PruneStage(ratio="auto").search_depth_ratios
    assert depth_ratios(14, default) == [0.25, 0.33, 0.5] and depth_ratios(6, default) == [0.33, 0.5]
    assert depth_ratios(4, default) == [0.33, 0.5]
    assert depth_ratios(14, [0.15, 0.25, 0.33]) == [0.15, 0.25, 0.33]  # 2, 4 and 5 of 14 blocks
    fpgm = families(PruneStage(ratio="auto", importance="fpgm"), model, ex)
    assert not any(c.importance for f in fpgm for c in f)  # the recipe's own importance is not tried twice
    act = families(PruneStage(ratio="auto", importance="activation"), model, ex)
    assert not any(c.importance for f in act for c in f)  # a data-aware ranking stands alone
    assert Candidate(ratio=0.2, importance="fpgm").config(PruneStage(ratio="auto")).importance == "fpgm"
    assert Candidate(ratio=0.2).record() == {"ratio": 0.2, "head_ratio": 0.0, "depth_ratio": 0.0}
    x = torch.randint(0, 30, (3, 32))
    rep = prune(model, PruneStage(ratio=0.0, depth_ratio=0.5), ex, train=None, names=["tokens"])
    assert rep.blocks == {"layers": [0, 3]} and len(model.layers) == 2 and rep.macs_ratio < 0.75
    save_structured(model, tmp_path)
    again = load_structured(ModelSpec(factory="edgebundle.zoo:tiny_encoder", kwargs={"layers": 4}), tmp_path, tmp_path)
    assert len(again.layers) == 2
    assert torch.equal(model.eval()(x), again(x))


def test_depth_pruning_with_compensation_bridges_the_dropped_blocks_chosen_by_measurement(tmp_path):
    """compensate least_squares: each run of dropped blocks becomes a linear bridge fitted on training inputs,
    the blocks that go are the ones that cost least; the output stays closer to the original's on unseen
    inputs than with the blocks simply dropped; the structure saves, reloads and distils (hidden matching)."""
    from edgebundle.core.data import Split
    from edgebundle.core.modelio import Bridge, load_structured, save_structured
    from edgebundle.core.recipe import DistillStage
    from edgebundle.stages.pruning import prune
    from edgebundle.stages.training import _depth_renames, distill
    from edgebundle.zoo import tiny_encoder

    torch.manual_seed(0)
    original = tiny_encoder(layers=4).eval()
    ex = (torch.zeros(1, 32, dtype=torch.long),)
    rng = np.random.default_rng(0)
    train = Split({"tokens": rng.integers(0, 30, (256, 32)).astype(np.int64)}, None)
    unseen = torch.from_numpy(rng.integers(0, 30, (128, 32)).astype(np.int64))
    with torch.no_grad():
        ref = original(unseen)

    def error(cfg):
        model = copy.deepcopy(original)
        rep = prune(model, cfg, ex, train=train, names=["tokens"])
        with torch.no_grad():
            return model, rep, float(((model(unseen) - ref) ** 2).mean() / (ref ** 2).mean())

    plain, rep_plain, e_plain = error(PruneStage(ratio=0.0, depth_ratio=0.5, compensate="none"))
    shifted, _, e_shift = error(PruneStage(ratio=0.0, depth_ratio=0.5, compensate="mean"))
    model, rep, e_linear = error(PruneStage(ratio=0.0, depth_ratio=0.5, compensate="least_squares"))
    assert rep_plain.blocks == {"layers": [0, 3]} and not any(isinstance(b, Bridge) for b in plain.layers)
    bridges = [b for b in model.layers if isinstance(b, Bridge)]
    assert bridges and all(b.linear is not None for b in bridges)
    assert all(b.linear is None for b in shifted.layers if isinstance(b, Bridge))
    assert len(rep.blocks["layers"]) == 2 and len(model.layers) == 2 + len(bridges)
    assert e_linear < 0.7 * e_plain and e_linear < e_shift, (e_plain, e_shift, e_linear)
    save_structured(model, tmp_path)
    again = load_structured(ModelSpec(factory="edgebundle.zoo:tiny_encoder", kwargs={"layers": 4}), tmp_path, tmp_path)
    assert [type(b) for b in again.layers] == [type(b) for b in model.layers]
    assert torch.equal(model.eval()(unseen), again(unseen))
    renames = _depth_renames(again, original)  # every kept block and every bridge stands for one original block
    assert sorted(v for v in renames.values() if v) == [f"layers.{i}" for i in range(len(again.layers))]
    val = Split({"tokens": unseen.numpy()}, None)
    fit = distill(again, original, train, val, ["tokens"], DistillStage(epochs=1, lr=1e-4, batch_size=32,
                                                                        hidden_weight=1.0, loss="mse"),
                  seed=0, device=torch.device("cpu"))
    assert len(fit.history) == 1 and np.isfinite(fit.history[0])


def test_the_greedy_order_is_priced_once_for_nested_depth_candidates(monkeypatch):
    """Dropping k + 1 blocks begins with the k dropped first: a second, deeper candidate of the same original on
    the same inputs prices only the steps it adds, and keeps what a fresh choice keeps."""
    from edgebundle.core.data import Split
    from edgebundle.stages import depth
    from edgebundle.zoo import tiny_encoder

    torch.manual_seed(0)
    original = tiny_encoder(layers=4).eval()
    ex = (torch.zeros(1, 32, dtype=torch.long),)
    train = Split({"tokens": np.random.default_rng(0).integers(0, 30, (64, 32)).astype(np.int64)}, None)
    calls = []
    price = depth.States.price
    monkeypatch.setattr(depth.States, "price", lambda self, *a: calls.append(a[0]) or price(self, *a))
    monkeypatch.setattr(depth, "_ORDERS", {})

    def drop(ratio):
        calls.clear()
        return depth.drop_blocks(copy.deepcopy(original), PruneStage(ratio=0.0, depth_ratio=ratio, compensate="mean"),
                                 ex, train, ["tokens"], 32), len(calls)

    one, n1 = drop(0.25)
    two, n2 = drop(0.5)
    assert n1 == 4 * 2 and n2 == 3 * 2  # (blocks left) x (plain, shift): the first step is not priced again
    assert set(one["layers"]) > set(two["layers"]) and len(two["layers"]) == 2
    # the kept structure after the search: its order is known, so no pricing, and the hidden states are
    # captured (a forward pass over the inputs) only when the last step fits a bridge
    captures = []
    init = depth.States.__init__
    monkeypatch.setattr(depth.States, "__init__", lambda self, *a, **k: captures.append(1) or init(self, *a, **k))
    (steps,) = depth._ORDERS.values()
    assert drop(0.25) == (one, 0) and len(captures) == (steps[0][1] != "plain")
    captures.clear()
    steps[0] = (steps[0][0], "plain")  # the same block dropped without a bridge: nothing to capture
    assert drop(0.25) == (one, 0) and not captures
    assert drop(0.05) == ({"layers": [0, 1, 2, 3]}, 0) and not captures  # a ratio that drops no block of 4
    monkeypatch.setattr(depth, "_ORDERS", {})
    assert drop(0.05) == ({"layers": [0, 1, 2, 3]}, 0) and not captures  # nor with no order priced yet
    monkeypatch.setattr(depth, "_ORDERS", {})
    assert drop(0.5) == (two, 4 * 2 + 3 * 2)


def test_dropped_blocks_are_priced_as_the_metric_reads_the_output():
    """Class scores: the KL divergence of their softmax (a shift of every logit changes no prediction and
    costs nothing; moving the probability mass does); embeddings and the rest: relative mean squared error."""
    from edgebundle.stages.depth import _cost, output_cost

    assert output_cost("agreement") == output_cost("top1") == "kl"
    assert output_cost("cosine") == output_cost(None) == "mse"
    torch.manual_seed(0)
    ref = torch.randn(16, 10) * 3
    shifted = ref + 5.0
    flat = torch.zeros_like(ref)
    assert _cost([shifted], [ref], "kl") < 1e-9 < 0.5 < _cost([shifted], [ref], "mse")
    assert _cost([flat], [ref], "kl") > 0.5
    assert _cost([ref[:8], ref[8:]], [ref[:8], ref[8:]], "kl") == 0.0


def test_depth_pruning_of_a_cnn_is_refused_in_one_line():
    from edgebundle.stages.pruning import prune
    from edgebundle.zoo import digits_cnn

    with pytest.raises(RecipeError, match="depth_ratio"):
        prune(digits_cnn(), PruneStage(ratio=0.0, depth_ratio=0.5), (torch.zeros(1, 1, 8, 8),), train=None,
              names=["image"])


@pytest.mark.parametrize("prune, ok", [({"ratio": "auto"}, True), ({"ratio": "most"}, False),
                                       ({"ratio": 1.0}, False), ({"ratio": "auto", "search_ratios": [0.0]}, False),
                                       ({"ratio": "auto", "search_minutes": 0}, False),
                                       ({"ratio": "auto", "search_depth_ratios": [1.0]}, False)])
def test_prune_ratio_auto_and_its_search_settings_are_validated(tmp_path, prune, ok):
    d = default_dict()
    d["stages"]["prune"] = prune
    if ok:
        assert recipe_from_dict(d, base_dir=tmp_path).stages.prune.searched
    else:
        with pytest.raises(RecipeError, match="stages.prune"):
            recipe_from_dict(d, base_dir=tmp_path)


def test_a_fixed_ratio_keeps_its_cache_key(default_run):
    """The search's settings enter the prune stage's key only when the search runs: work folders prepared
    before they existed stay valid."""
    prune = next(a for a in default_run.prepared.lineage if a.stage == "prune")
    assert set(prune.config["prune"]) & {"search_minutes", "search_ratios", "search_epochs", "depth_ratio"} == set()
    assert json.loads(json.dumps(prune.config))["prune"]["ratio"] == 0.5
    assert yaml.safe_load(yaml.safe_dump(default_dict()))["stages"]["prune"]["ratio"] == 0.5


def test_the_kept_candidate_must_beat_the_timing_noise_and_hold_the_budget():
    from edgebundle.stages.search import choose

    def row(ratio, speedup, ci, within=True):
        return {"candidate": {"ratio": ratio, "head_ratio": 0.0, "depth_ratio": 0.0}, "speedup": speedup,
                "speedup_ci95": ci, "within": within}

    unpruned = row(0.0, 1.02, [0.99, 1.06])
    assert choose([unpruned, row(0.1, 1.05, [1.03, 1.08]), row(0.2, 1.3, [1.2, 1.4], within=False)])["ratio"] == 0.0
    assert choose([unpruned, row(0.1, 1.12, [1.08, 1.15]), row(0.2, 1.3, [1.2, 1.4])])["ratio"] == 0.2
    assert choose([unpruned, row(0.1, 1.12, [1.08, 1.15]), row(0.2, 1.3, [1.2, 1.4], within=False)])["ratio"] == 0.1


def test_a_candidate_whose_distillation_kept_the_pruned_start_says_so():
    """all-MiniLM-L6-v2's refitted quarter of the MLP started at validation cosine 0.982 and every epoch of the
    search's distillation lowered it: the row's figure is the pruned start's, and its line says so."""
    from edgebundle.stages.search import _row_text

    row = {"candidate": {"ratio": 0.25, "head_ratio": 0.0, "depth_ratio": 0.0}, "label": "ratio 0.25",
           "fp32_over": True, "summary": "fp32 student cosine mean 0.9822 / min 0.8455", "status": "over budget"}
    assert "no distillation epoch" not in _row_text(row)
    assert "no distillation epoch beat the pruned start" in _row_text({**row, "distill_best_epoch": -1})
    timed = {**row, "fp32_over": False, "speedup": 1.07, "distill_best_epoch": -1, "line": "x"}
    assert "no distillation epoch beat the pruned start" in _row_text(timed)


def test_input_scale_resizes_inside_the_network_and_the_bundle_keeps_its_input(tmp_path):
    """prune.input_scale: the network sees its images at a share of their side (fewer MACs: a convolution's
    cost goes with the pixels); callers, the reloaded model and the ONNX export keep the recipe's input shape,
    with the resize in front (a Resize node)."""
    import onnx
    import onnxruntime as ort
    import torch.nn.functional as F

    from edgebundle.core.modelio import load_structured, save_structured
    from edgebundle.core.recipe import ExportStage, InputSpec
    from edgebundle.exporters.onnx import export
    from edgebundle.stages.pruning import prune
    from edgebundle.stages.search import Candidate, families, together
    from edgebundle.zoo import digits_cnn, tiny_encoder

    torch.manual_seed(0)
    model = digits_cnn().eval()
    ex = (torch.zeros(1, 1, 8, 8),)
    x = torch.randn(3, 1, 8, 8)
    student = copy.deepcopy(model)
    rep = prune(student, PruneStage(ratio=0.0, input_scale=0.75), ex, train=None, names=["image"])
    assert rep.input_size == (6, 6) and rep.macs_ratio < 0.7
    with torch.no_grad():
        assert torch.allclose(student(x), model(F.interpolate(x, size=(6, 6), mode="bilinear")), atol=1e-6)
        assert not torch.allclose(student(x), model(x), atol=1e-3)
    save_structured(student, tmp_path)
    again = load_structured(ModelSpec(factory="edgebundle.zoo:digits_cnn"), tmp_path, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), student(x))
        twice = copy.deepcopy(again)
        assert torch.equal(twice(x), student(x))  # a copy keeps the resize, once
    spec = InputSpec(name="image", shape=[1, 1, 8, 8], dynamic_axes={0: "batch"})
    export(again, [spec], ["logits"], ExportStage(), tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert "Resize" in [n.op_type for n in graph.node][:3]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:] == [1, 8, 8]
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[0]
    assert np.allclose(got, student(x).detach().numpy(), atol=1e-4)

    # the search: a family for image models only, mild to strong; each family's strongest within budget together
    cfg = PruneStage(ratio="auto", search_ratios=[], search_input_scales=[0.75, 0.875])
    assert [[c.label for c in f] for f in families(cfg, model, ex)] == [["input scale 0.875", "input scale 0.75"]]
    assert families(cfg, tiny_encoder(layers=2), (torch.zeros(1, 32, dtype=torch.long),))[-1][0].depth_ratio > 0
    assert Candidate(input_scale=0.75).record() == {"ratio": 0.0, "head_ratio": 0.0, "depth_ratio": 0.0,
                                                    "input_scale": 0.75}
    assert Candidate(input_scale=0.75).config(cfg).input_scale == 0.75 and Candidate().config(cfg).input_scale == 1
    both = together([Candidate(depth_ratio=0.15), Candidate(input_scale=0.875)])
    assert both == Candidate(depth_ratio=0.15, input_scale=0.875)
    assert both.label == "depth ratio 0.15, input scale 0.875"
    assert together([Candidate(ratio=0.2), Candidate(ratio=0.1, importance="fpgm")]) is None  # the same field
    with pytest.raises(RecipeError, match="input_scale: the model has no image input"):
        prune(tiny_encoder(layers=2), PruneStage(ratio=0.0, input_scale=0.5), (torch.zeros(1, 32, dtype=torch.long),),
              train=None, names=["tokens"])


def test_search_samples_caps_what_each_candidate_learns_from_the_same_for_all():
    from edgebundle.core.data import Split, joined_rows
    from edgebundle.stages.search import _learns_from

    train = Split({"image": joined_rows(np.arange(60, dtype=np.float32).reshape(30, 2),
                                        np.arange(100, 120, dtype=np.float32).reshape(10, 2))}, None)
    assert _learns_from(train, None, 0) is train and _learns_from(train, 40, 0) is train
    some = _learns_from(train, 12, 0)
    rows = np.asarray(some.inputs["image"])
    assert len(some) == 12 and len({tuple(r) for r in rows}) == 12
    assert np.array_equal(rows, np.asarray(_learns_from(train, 12, 0).inputs["image"]))  # every candidate's
    assert (rows[:, 0] >= 100).any() and (rows[:, 0] < 100).any()  # from both sources
    assert PruneStage(ratio="auto", search_samples=600).search_samples == 600
    with pytest.raises(ValueError):
        PruneStage(ratio="auto", search_samples=0)


def test_a_candidate_that_would_overrun_search_minutes_is_not_started():
    from edgebundle.stages.search import out_of_time

    rows = [{"label": "unpruned", "seconds": 40.0}, {"label": "depth ratio 0.15", "seconds": 337.0},
            {"label": "input scale 0.933", "seconds": 756.0}]
    assert out_of_time(rows[:1], 100.0, 1800.0) is None  # nothing pruned priced yet: no estimate, it starts
    assert out_of_time(rows, 1000.0, 1800.0) is None  # 1000 s spent + the longest 756 s fits in 30 min
    why = out_of_time(rows, 1100.0, 1800.0)
    assert why is not None and why.startswith("search_minutes ran out") and "12.6" in why
    assert out_of_time(rows[:1], 1801.0, 1800.0) == "search_minutes ran out"
