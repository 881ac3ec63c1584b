"""raycraft's population-based training on real Ray Tune: the bottom trial takes over the top trial's
checkpoint (cloned beside it), explores within the space's bounds, and only moves forward; the scheduler's
verdicts reach the sweep's pacer. The trials are tiny: their whole state is one number."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import ray
import ray.cloudpickle
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from raycraft.sweep import pacing
from raycraft.sweep.pbt import EXPLOIT_KEY, PBT

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/

EPOCHS = 5
LOW, HIGH = 0.01, 1.0


def load(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "state.json").read_text())


def trial(config: dict) -> None:
    """A value that grows by `lr` each epoch, checkpointed to a folder whose path goes to Tune as Ray Train's
    checkpoints' do. A restarted trial continues as a run does: from its own newest checkpoint since its last
    exploit, else from the exploit's clone, else afresh. Each epoch is a line `epoch value` in its log."""
    trial_id = ray.tune.get_context().get_trial_id()
    exploit = config.get(EXPLOIT_KEY)
    own = Path(config["folder"]) / trial_id / f"gen{exploit['n'] if exploit else 0}"
    saved = sorted(own.glob("epoch_*"))
    state = load(saved[-1]) if saved else load(exploit["checkpoint"]) if exploit else {"epoch": -1, "value": 0.0}
    for epoch in range(state["epoch"] + 1, EPOCHS):
        state = {"epoch": epoch, "value": state["value"] + config["lr"]}
        folder = own / f"epoch_{epoch:04d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps(state))
        with (Path(config["folder"]) / f"{trial_id}.log").open("a") as log:
            log.write(f"{epoch} {state['value']}\n")
        ray.tune.report({"epoch": epoch, "value": state["value"], CHECKPOINT_PATH_KEY: str(folder)})


def test_the_bottom_trial_takes_over_the_top_trials_checkpoint(ray_session, tmp_path):
    sweep_id = uuid.uuid4().hex
    pacer, verdicts = pacing.Pacer(sweep_id), pacing.Pacer(sweep_id).start()
    scheduler = PBT(time_attr="epoch", perturbation_interval=1, quantile_fraction=0.5, resample_probability=0.0,
                    hyperparam_mutations={"lr": tune.uniform(LOW, HIGH)}, bounds={"lr": (LOW, HIGH)},
                    storage=str(tmp_path), pacer=pacer)
    try:
        results = tune.Tuner(
            tune.with_resources(trial, {"CPU": 0.1}),
            param_space={"lr": tune.grid_search([HIGH, LOW]), "folder": str(tmp_path)},
            tune_config=tune.TuneConfig(metric="value", mode="max", scheduler=scheduler),
            run_config=tune.RunConfig(name="pbt", storage_path=str(tmp_path / "tune"), verbose=0)).fit()
        assert not results.errors, results.errors
        by_id = {r.metrics["trial_id"]: r for r in results}
        weak = next(r for r in results if EXPLOIT_KEY in r.config)
        strong_id = weak.config[EXPLOIT_KEY]["donor_trial"]
        assert set(by_id) == {strong_id, weak.metrics["trial_id"]}  # the weak one took over the strong one

        epochs = [[float(x) for x in line.split()] for line in
                  (tmp_path / f"{weak.metrics['trial_id']}.log").read_text().splitlines()]
        assert [int(e) for e, _ in epochs] == sorted({int(e) for e, _ in epochs})  # forward only, each once
        assert epochs[-1][0] == EPOCHS - 1 and epochs[0][1] < 0.05 and epochs[-1][1] > 1.0  # far past lr 0.01
        clone = load(weak.config[EXPLOIT_KEY]["checkpoint"])  # the donor's state, copied beside its own
        assert clone == load(tmp_path / strong_id / "gen0" / f"epoch_{clone['epoch']:04d}")
        assert Path(weak.config[EXPLOIT_KEY]["checkpoint"]).name.startswith("pbt_clone_")
        assert LOW <= weak.config["lr"] <= HIGH
        for trial_id in by_id:  # what the scheduler decided reached the pacer
            assert pacer.verdict(trial_id, 0, timeout_s=0) == "go"
    finally:
        ray.kill(verdicts)
