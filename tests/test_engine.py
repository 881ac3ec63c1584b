"""The sweep's engine on real Ray Tune and a real MLflow store (a SQLite file and a remote tracking server): its
scheduler stops trials through the pacer, its callback records how each trial ended in the trial's MLflow run,
and `summarize` records the best trial on the parent run. The trials stand in for `run_trial` with a job that
trains in no time (`paced`); `test_sweep_e2e` runs real jobs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import yaml
from paced import EPOCHS, stopped_after_first_epoch, train_paced
from ray import tune

from raycraft import tracking
from raycraft.config import flatten, to_dict
from raycraft.errors import UserError
from raycraft.sweep import engine, pacing
from raycraft.sweep.config import load_sweep
from raycraft.sweep.engine import EARLY_TAG, PARENT_TAG, TRIAL_TAG

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/


def sweep_data(tmp_path: Path, name: str) -> dict:
    """As in test_sweep_e2e: a good and a hopeless learning rate, each twice; ASHA must stop the hopeless ones."""
    return {"name": name, "job": {"model": "mlp", "dataset": "digits", "epochs": EPOCHS,
                                  "storage_path": str(tmp_path / "train")},
            "space": {"optim.lr": {"grid": [3e-3, 1e-7]}}, "search": "random",
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "metric": "val_accuracy", "mode": "max", "samples": 2, "concurrency": 1,
            "experiment": f"sweep-{name}", "storage_path": str(tmp_path / "tune")}


def trial(params: dict, *, sweep, uri: str, parent: str, folder: str) -> None:
    """`run_trial` in miniature: the trial's child run, tagged as `run_trial` tags it, then epochs whose
    val_accuracy says how good the learning rate is, each logged to the run, paced by the scheduler."""
    trial_id = ray.tune.get_context().get_trial_id()
    cfg, _ = sweep.kind.build(sweep.trial_job(params))
    run = tracking.Run.start(uri, sweep.config.experiment, f"{sweep.config.name}-{trial_id}", flatten(to_dict(cfg)),
                             {PARENT_TAG: parent, TRIAL_TAG: trial_id}, yaml.safe_dump(to_dict(cfg)))
    accuracy = 0.9 if params["optim.lr"] > 1e-4 else 0.1

    def epoch(n: int) -> dict[str, float]:
        metrics = {"epoch": float(n), "val_accuracy": accuracy + 0.01 * n}
        run.log_epoch(metrics)
        return metrics

    def finish() -> dict[str, float]:
        run.log_metrics({"test_accuracy": accuracy})
        run.end("FINISHED")
        return {**epoch(EPOCHS - 1), "test_accuracy": accuracy}

    train_paced(parent, folder, epoch, finish)


# The tracking-server store is heavy (about 240 s beside other tests): the engine's logic is the same on both stores,
# and the default suite logs to a server in test_train_e2e, test_tracking and test_cli_conventions.
@pytest.mark.parametrize("store_uri", ["sqlite", pytest.param("server", marks=pytest.mark.heavy)], indirect=True)
def test_asha_sweep_marks_stopped_trials_and_records_the_best(ray_session, store_uri, tmp_path):
    sweep = load_sweep(data=sweep_data(tmp_path, "engine4"))
    parent = engine.start_parent(sweep, store_uri)
    verdicts = pacing.Pacer(parent).start()
    try:
        results = tune.Tuner(
            tune.with_resources(tune.with_parameters(trial, sweep=sweep, uri=store_uri, parent=parent,
                                                     folder=str(tmp_path)), {"CPU": 0.1}),
            param_space=sweep.param_space(),
            tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", num_samples=2,
                                        search_alg=engine.build_search(sweep),
                                        scheduler=engine.build_scheduler(sweep, pacing.Pacer(parent))),
            run_config=tune.RunConfig(name="engine4", storage_path=str(tmp_path / "tune"), verbose=0,
                                      callbacks=[engine.MlflowSweepCallback(store_uri, "sweep-engine4", parent,
                                                                            "train", verbose=False)])).fit()
    finally:
        ray.kill(verdicts)
    assert not results.errors, results.errors
    out = engine.summarize(sweep, store_uri, parent)

    kids = {k.info.run_id: tracking.get_run(store_uri, k.info.run_id) for k in out.children}
    assert len(kids) == 4 and len({k.data.tags[TRIAL_TAG] for k in kids.values()}) == 4
    early = [k for k in kids.values() if k.data.tags[EARLY_TAG] == "true"]
    full = [k for k in kids.values() if k.data.tags[EARLY_TAG] == "false"]
    assert {k.data.params["optim.lr"] for k in early} == {"1e-07"} and len(early) == 2
    assert {k.data.params["optim.lr"] for k in full} == {"0.003"} and len(full) == 2
    for k in early:  # stopped at its first rung: the training went no further
        assert k.info.status == "KILLED" and "test_accuracy" not in k.data.metrics
        assert stopped_after_first_epoch(tmp_path, k.data.tags[TRIAL_TAG])
    for k in full:
        assert k.info.status == "FINISHED" and "test_accuracy" in k.data.metrics
        assert sorted(int(m.step) for m in tracking.metric_history(store_uri, k.info.run_id, "epoch")) == [0, 1, 2, 3]

    record = tracking.get_run(store_uri, parent)
    assert record.info.status == "FINISHED" and out.best_run_id in {k.info.run_id for k in full}
    assert record.data.tags["raycraft.best_run_id"] == out.best_run_id and record.data.tags["best.optim.lr"] == "0.003"
    assert record.data.metrics["trials"] == 4 and record.data.metrics["trials_early_stopped"] == 2
    assert yaml.safe_load(tracking.download_text(store_uri, parent, "best_config.yaml"))["optim"]["lr"] == 0.003


def test_a_sweep_name_is_used_once_and_resume_names_the_sweeps_there(tmp_path):
    sweep = load_sweep(data=sweep_data(tmp_path, "taken"))
    (tmp_path / "tune" / "taken").mkdir(parents=True)
    with pytest.raises(UserError, match="a sweep 'taken' already exists .*--resume taken"):
        engine.run_sweep(sweep, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "tune" / "taken" / engine.STATE_FILE).write_text("parent_run_id: x\n")
    with pytest.raises(UserError, match="no sweep 'other' in .*Sweeps there: taken"):
        engine.resume_sweep("other", str(tmp_path / "tune"))
