import pytest

from edgebundle.targets.registry import check_targets

from edgebundle.core.errors import RecipeError
from edgebundle.core.recipe import load_recipe, recipe_from_dict
from conftest import default_dict


def test_embedded_default_loads():
    r = load_recipe(None)
    assert r.model.factory == "edgebundle.zoo:digits_cnn"
    assert [t.name for t in r.targets] == ["ort-cpu", "openvino"]
    assert r.inputs[0].dynamic_axes == {0: "batch"}


def test_missing_recipe(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_key_is_named(tmp_path):
    d = default_dict()
    d["stages"]["prune"]["ratoi"] = 0.3
    with pytest.raises(RecipeError, match=r"unknown key 'stages.prune.ratoi'"):
        recipe_from_dict(d, base_dir=tmp_path)


def test_wrong_type_is_named(tmp_path):
    d = default_dict()
    d["stages"]["distill"]["epochs"] = "many"
    with pytest.raises(RecipeError, match=r"stages.distill.epochs"):
        recipe_from_dict(d, base_dir=tmp_path)


def test_unknown_target_lists_available(tmp_path):
    d = default_dict()
    d["targets"] = [{"name": "trt"}]
    with pytest.raises(RecipeError, match=r"targets.0.name: unknown target 'trt'; available: .*ort-cpu"):
        check_targets(recipe_from_dict(d, base_dir=tmp_path))


def test_target_options_validated_by_target(tmp_path):
    d = default_dict()
    d["targets"] = [{"name": "ort-cpu", "options": {"quant_format": "qoperator", "activations": "int8"}}]
    with pytest.raises(RecipeError, match="qoperator"):
        check_targets(recipe_from_dict(d, base_dir=tmp_path))
    d["targets"] = [{"name": "ort-cpu", "options": {"bogus": 1}}]
    with pytest.raises(RecipeError, match="unknown key 'targets.0.options.bogus'"):
        check_targets(recipe_from_dict(d, base_dir=tmp_path))


@pytest.mark.parametrize("shape,msg", [([1, 0, 8, 8], "must be > 0"), ([1, 1, 100000, 100000], "above the limit")])
def test_bad_dimensions(tmp_path, shape, msg):
    d = default_dict()
    d["inputs"][0]["shape"] = shape
    with pytest.raises(RecipeError, match=msg):
        recipe_from_dict(d, base_dir=tmp_path)


def test_splits_must_sum_to_one(tmp_path):
    d = default_dict()
    d["data"]["splits"] = {"train": 0.5, "val": 0.2, "test": 0.2}
    with pytest.raises(RecipeError, match="must be 1"):
        recipe_from_dict(d, base_dir=tmp_path)


def test_top_level_must_be_mapping(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(p)


def test_example_recipes_load():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert examples
    for p in examples:
        assert load_recipe(p).name


def test_non_finite_target_options_are_refused_with_their_path(tmp_path):
    d = default_dict()
    d["targets"] = [{"name": "ort-cpu", "options": {"qat": {"lr": float("inf")}}}]
    with pytest.raises(RecipeError, match=r"targets\.0\.options\.qat\.lr"):
        check_targets(recipe_from_dict(d, base_dir=tmp_path))


def test_a_user_code_limit_below_a_tenth_of_a_second_is_refused(tmp_path):
    """A stop that can land before any handler is installed (1e-9 s ended the process by SIGALRM, 60 lines)."""
    import yaml

    d = default_dict()
    d["limits"] = {"user_code_s": 1e-9}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(RecipeError, match=r"limits.user_code_s: Input should be greater than or equal to 0.1"):
        load_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize("stage", ["train", "distill", "cluster"])
def test_a_batch_of_one_is_refused_where_it_would_train_nothing(tmp_path, stage):
    """Training steps skip batches of one row (BatchNorm cannot learn from them): batch_size 1 trained nothing,
    silently, and shipped the untrained model."""
    import yaml

    d = default_dict()
    d["stages"][stage] = {**d["stages"].get(stage, {}), "batch_size": 1}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(RecipeError, match=rf"stages.{stage}.batch_size: Input should be greater than or equal to 2"):
        load_recipe(tmp_path / "r.yaml")


def test_an_empty_output_folder_name_is_refused(tmp_path):
    import yaml

    d = default_dict()
    d["output"] = ""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(RecipeError, match=r"output: empty; name the folder the bundles go to"):
        load_recipe(tmp_path / "r.yaml")
