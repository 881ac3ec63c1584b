"""The sweep's pacer (a Ray actor) carries its scheduler's verdicts to the trials' training: raycraft's ASHA and
FIFO on real Ray Tune, over trials whose training runs ahead of Tune (`paced`), and the pacer on its own."""

from __future__ import annotations

import sys
import threading
import time
import uuid

import pytest
import ray
import ray.cloudpickle
from paced import EPOCHS, WAIT_S, events, slowest_verdict, stopped_after_first_epoch, train_paced
from ray import tune

from raycraft.sweep import pacing

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/


@pytest.fixture
def pacer(ray_session):
    """A sweep's pacer, started as the sweep's driver starts it, and its id."""
    sweep_id = uuid.uuid4().hex
    verdicts = pacing.Pacer(sweep_id).start()
    yield pacing.Pacer(sweep_id)
    ray.kill(verdicts)


def trial(config: dict) -> None:
    train_paced(config["sweep_id"], config["folder"], lambda epoch: {"epoch": epoch, "score": config["score"]})


def run_trials(pacer: pacing.Pacer, scheduler, folder, scores: list[float]) -> dict[float, str]:
    """One trial per score, one after another, under `scheduler`: {score: trial id}."""
    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": 0.1}),
        param_space={"score": tune.grid_search(scores), "sweep_id": pacer.sweep_id,
                     "folder": str(folder)},
        tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=1, scheduler=scheduler),
        run_config=tune.RunConfig(name="pacing", storage_path=str(folder / "tune"), verbose=0))
    results = tuner.fit()
    assert not results.errors, results.errors
    return {r.config["score"]: r.metrics["trial_id"] for r in results}


def test_asha_stops_the_weak_trial_at_its_first_rung_and_lets_the_strong_one_run(pacer, tmp_path):
    ids = run_trials(pacer, pacing.ASHA(max_t=EPOCHS, grace_period=1, reduction_factor=2, pacer=pacer), tmp_path,
                     [1.0, 0.01])
    strong, weak = ids[1.0], ids[0.01]
    assert events(tmp_path, strong) == [x for e in range(EPOCHS - 1) for x in (f"epoch {e}", f"go {e}")] + [
        f"epoch {EPOCHS - 1}", "finished"]
    assert stopped_after_first_epoch(tmp_path, weak) and slowest_verdict(tmp_path, weak) < 10
    assert slowest_verdict(tmp_path, strong) < WAIT_S / 2
    assert pacer.verdict(weak, 0, timeout_s=0) == "stop" and pacer.verdict(strong, EPOCHS - 2, timeout_s=0) == "go"


def test_fifo_lets_every_trial_run_to_its_end(pacer, tmp_path):
    ids = run_trials(pacer, pacing.FIFO(pacer=pacer), tmp_path, [1.0, 0.01])
    for trial_id in ids.values():
        assert events(tmp_path, trial_id)[-2:] == [f"epoch {EPOCHS - 1}", "finished"]
        assert slowest_verdict(tmp_path, trial_id) < WAIT_S / 2


def test_a_waiting_trial_hears_its_verdict_at_once(pacer):
    """A verdict wakes the trial waiting for it (no polling); a trial with none goes on after its timeout.

    Woken by the verdict means answered well inside the gate's timeout, counted from the verdict; a loaded
    machine may take seconds to schedule the thread, so the bound is half the timeout, not a latency goal.
    """
    gate_s = 60.0
    answers = {}

    def ask(trial_id: str, epoch: int) -> threading.Thread:
        def wait() -> None:
            answers[trial_id] = (pacing.Gate(pacer, trial_id, gate_s).may_continue(epoch), time.monotonic())

        waiting = threading.Thread(target=wait)
        waiting.start()
        return waiting

    going, stopping = ask("t1", 3), ask("t2", 0)
    time.sleep(1.0)
    assert going.is_alive() and stopping.is_alive()  # nothing decided yet
    pacer.allow("t1", 2)
    time.sleep(0.5)
    assert going.is_alive()  # epoch 2 is not epoch 3
    decided = time.monotonic()
    pacer.allow("t1", 3)
    pacer.stop("t2")
    going.join(timeout=gate_s)
    stopping.join(timeout=gate_s)
    assert answers["t1"][0] is True and answers["t1"][1] - decided < gate_s / 2
    assert answers["t2"][0] is False and answers["t2"][1] - decided < gate_s / 2
    assert pacer.verdict("t3", 0, timeout_s=0.2) == "none"
    assert pacing.Gate(pacer, "t3", timeout_s=0.2).may_continue(0)  # no word: the trial goes on


def test_a_pacer_travels_by_name(pacer):
    """Tune pickles its scheduler and Ray the trials' hooks: a copy holds the name only, and finds the actor."""
    pacer.allow("t4", 1)
    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(pacing.Gate(pacer, "t4")))
    assert copy.pacer._actor is None and copy.may_continue(1)
