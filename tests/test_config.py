"""Typed configs: YAML and --set load into dataclasses, and bad input names the key, value and choices."""

from __future__ import annotations

import pytest

from raycraft.config import coerce, from_dict, load_yaml, parse_override
from raycraft.errors import UserError
from raycraft.train.config import OptimConfig, TrainConfig, build_config


def test_overrides_are_typed_and_nested():
    cfg, model_cfg = build_config({"model": "mlp", "dataset": "digits"},
                                  ["optim.lr=3e-4", "epochs=7", "hidden=[64, 32]", "norm=dyt", "gpu=false"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.epochs == 7
    assert model_cfg.hidden == (64, 32) and model_cfg.norm == "dyt"
    assert cfg.model_args["hidden"] == [64, 32]  # stored as plain data for YAML and MLflow


def test_model_keys_without_prefix_equal_prefixed():
    a, _ = build_config({"model": "mlp", "dataset": "digits"}, ["dropout=0.3"])
    b, _ = build_config({"model": "mlp", "dataset": "digits"}, ["model_args.dropout=0.3"])
    assert a.model_args == b.model_args


def test_recipe_is_overridden_by_user():
    cfg, _ = build_config({"model": "lenet5", "dataset": "digits"})
    assert cfg.epochs == 40 and cfg.optim.lr == pytest.approx(3e-3)
    cfg, _ = build_config({"model": "lenet5", "dataset": "digits", "epochs": 2}, ["optim.lr=0.1"])
    assert cfg.epochs == 2 and cfg.optim.lr == pytest.approx(0.1) and cfg.optim.weight_decay == 0.05
    again, _ = build_config({"model": "lenet5", "dataset": "digits"})  # the override left the recipe as it was
    assert again.optim.lr == pytest.approx(3e-3)


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=0.1", ["optim: unknown key", "'lrr'", "lr"]),
    ("optim.lr=fast", ["optim.lr", "expected a number", "'fast'"]),
    ("epochs=2.5", ["epochs", "expected an integer"]),
    ("optim.name=adagrad", ["optim.name", "'adagrad'", "adam, adamw, rmsprop, sgd"]),
    ("dropot=0.1", ["unknown key", "'dropot'", "dropout"]),
    ("workers=0", ["--workers", "at least 1"]),
    ("novalue", ["key=value"]),
])
def test_bad_overrides_name_field_value_and_choices(override, words):
    with pytest.raises(UserError) as err:
        build_config({"model": "mlp", "dataset": "digits"}, [override])
    for w in words:
        assert w in str(err.value)


def test_unknown_model_suggests_closest():
    with pytest.raises(UserError, match="lenet5"):
        build_config({"model": "lenet", "dataset": "digits"})


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: lenet5\n  epochs: [3\n")
    with pytest.raises(UserError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_yaml(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    from raycraft.config import to_dict

    cfg, _ = build_config({"model": "vgg11", "dataset": "mnist5k", "optim": {"name": "sgd", "lr": 0.05}})
    again = from_dict(TrainConfig, to_dict(cfg))
    assert again == cfg


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=0.001") == ("a.b", 0.001)
    assert coerce("optim.lr", parse_override("optim.lr=1e-3")[1], float) == 1e-3  # YAML 1.1 gives '1e-3'
    assert parse_override("flag=true") == ("flag", True)
    assert parse_override("name=adamw") == ("name", "adamw")
    assert parse_override("clip=null") == ("clip", None)


def test_optim_validation():
    with pytest.raises(UserError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(UserError, match="optim.grad_clip"):
        OptimConfig(grad_clip=-1.0)
