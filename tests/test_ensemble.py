"""Model averaging: members trained separately, averaged in one exported graph, bundled like any model."""

import onnx
import pytest

from edgebundle.core.recipe import TargetSpec, load_recipe
from edgebundle.pipeline.runner import run


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    r = load_recipe("examples/ensemble.yaml")
    r = r.model_copy(update={
        "model": r.model.model_copy(update={"members": r.model.members[:2]}),
        "stages": r.stages.model_copy(update={"train": r.stages.train.model_copy(update={"epochs": 8})}),
        "targets": [TargetSpec(name="ort-cpu", measure={"iterations": 30}, options={"precision": "int8"})]})
    return run(r, output=tmp_path_factory.mktemp("ens") / "out")


def test_one_graph_holds_every_member(ensemble_run):
    b = ensemble_run.bundles[0]
    g = onnx.load(str(ensemble_run.prepared.onnx.path("model.fp32.onnx"))).graph
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert len(convs) == 2 * 4  # two members of four convolutions each, in one model
    assert b.manifest["accuracy"]["target"] is not None and b.manifest["accuracy"]["drop_vs_fp32"] <= 1.0


def test_ensemble_accuracy_is_reported_against_its_members(ensemble_run):
    t = ensemble_run.prepared.teacher.metrics
    members, ens = t["members_test_accuracy"], t["test_accuracy"]
    assert len(members) == 2
    assert ens >= sum(members) / len(members)  # averaging does not do worse than the average member
    lineage_teacher = ensemble_run.bundles[0].manifest["lineage"][0]
    assert lineage_teacher["metrics"]["members_test_accuracy"] == members
