"""Typed configs: YAML and --set load into dataclasses, and bad input names the key, value and choices."""

from __future__ import annotations

import pickle
import re

import pytest
from mlflow.tracking import MlflowClient

from conftest import assert_every_form_refused_alike, run_raycraft
from raycraft.config import coerce, flatten, from_dict, load_yaml, parse_override, to_dict
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


def test_model_config_is_typed_once_and_travels_with_the_config():
    cfg, model_cfg = build_config({"model": "mlp", "dataset": "digits"}, ["hidden=[8]"])
    assert cfg.model_config is model_cfg and model_cfg.hidden == (8,)
    again = pickle.loads(pickle.dumps(cfg))  # as Ray hands the config to a Ray Train worker or a Tune trial
    assert vars(again)["model_config"] == model_cfg  # built already: the worker does not validate it again
    assert "model_config" not in to_dict(cfg)  # config.yaml and the MLflow params hold model_args only
    assert flatten(to_dict(cfg))["model_args.hidden"] == [8]


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


# One bad value, written each way a user may: in a --config file dotted or nested, a model key with or without
# `model_args`, or with --set. Every form names the same field, so each is refused with the same message.
SAME_FIELD = {
    "optim.lr": (["optim.lr: fast", "optim: {lr: fast}"], "optim.lr=fast",
                 "optim.lr: expected a number, got 'fast'."),
    "dropout": (["dropout: fast", "model_args.dropout: fast", "model_args: {dropout: fast}"], "dropout=fast",
                "mlp.dropout: expected a number, got 'fast'."),
}


@pytest.mark.parametrize("field", list(SAME_FIELD))
def test_config_file_takes_the_keys_set_takes(tmp_path, field):
    assert_every_form_refused_alike(build_config, "model: mlp\ndataset: digits\n", *SAME_FIELD[field], tmp_path)


@pytest.mark.slow
def test_dotted_nested_and_model_keys_of_a_config_file_reach_the_run(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "model: lenet5\ndataset: digits\nepochs: 1\nin_process: true\n"
        "optim.lr: 0.005\n"  # dotted, over the recipe's 3e-3
        "optim: {name: sgd}\n"  # nested: merged into the recipe's optim, whose weight_decay stays
        "dropout: 0.1\nmodel_args.pool: avg\n")  # model keys, without and with the prefix
    out = run_raycraft(["train", "--config", "job.yaml"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run_id = re.search(r"run id: (\w{32})", out.stdout).group(1)
    params = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.params
    assert {k: params[k] for k in ("epochs", "batch_size", "optim.lr", "optim.name", "optim.weight_decay",
                                   "model_args.dropout", "model_args.pool", "model_args.activation")} == {
        "epochs": "1", "batch_size": "32", "optim.lr": "0.005", "optim.name": "sgd", "optim.weight_decay": "0.05",
        "model_args.dropout": "0.1", "model_args.pool": "avg", "model_args.activation": "relu"}
