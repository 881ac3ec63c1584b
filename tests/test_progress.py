"""What a person sees of a run's progress: the live displays of `raycraft train` (a bar per epoch), `raycraft rl`
(a bar over the iterations) and `raycraft tune` (a bar over the trials), driven with the events their commands
feed them into recording rich consoles: a terminal, where the bar moves and the summary lines stay, and a log
(CI, a pipe, `raycraft submit`), where there is no bar and one plain line per log interval."""

from __future__ import annotations

import io
import re
import sys
import time

from ray.tune.experiment import Trial
from rich.console import Console
from rich.progress import Task, TaskID

from raycraft.console import EpochProgress, IterationProgress, LiveProgress, TimeLeft, TrialProgress
from raycraft.sweep import engine

ETA = re.compile(r"· ETA \d+:\d\d:\d\d$")
UNKNOWN_ETA = "· ETA -:--:--"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def consoles(out_terminal: bool, err_terminal: bool | None = None) -> dict[str, Console]:
    """Recording stdout and stderr consoles, each a terminal or not (a log)."""
    flags = {"out": out_terminal, "err": out_terminal if err_terminal is None else err_terminal}
    return {name: Console(force_terminal=tty, force_interactive=tty, width=160, file=io.StringIO())
            for name, tty in flags.items()}


def frame(display: LiveProgress) -> str:
    """The bar as the terminal shows it now ('' while hidden)."""
    shot = Console(width=160, record=True, file=io.StringIO())
    shot.print(display.bar.get_renderable())
    return shot.export_text().strip()


def printed(console: Console) -> list[str]:
    """The lines a terminal (or a log) keeps of what `console` wrote: a carriage return goes back over its line,
    as the live bar does to redraw itself."""
    lines = (ANSI.sub("", line.split("\r")[-1]) for line in console.file.getvalue().split("\n"))
    return [line for line in lines if line.strip()]


def step(epoch: int, n: int, log_every: int = 0, loss: float = 0.4123, steps: int = 100) -> dict:
    """An event as `run_training` hands it to `on_step` (a loss of NaN: the task's step has none)."""
    return {"epoch": epoch, "step": n, "steps": steps, "samples_per_s": 2345.6, "loss": loss,
            "log": bool(log_every) and n % log_every == 0}


def feed(display: EpochProgress, events: list[dict]) -> None:
    for event in events:
        display.step(event)
        time.sleep(0.01)  # time between events, which the ETA's rate is measured over


def test_a_terminal_shows_a_bar_per_epoch_and_keeps_the_epoch_lines():
    cons = consoles(True)
    with EpochProgress(3, **cons) as shown:
        feed(shown, [step(0, n, log_every=5) for n in range(10, 70, 10)])
        now = frame(shown)
        assert now.startswith("epoch 1/3 ━") and "60/100 steps · 2,346 samples/s · loss 0.4123" in now, now
        assert ETA.search(now), now
        shown.ended("[bold]epoch 1/3[/]  train_loss 0.4  val_loss 0.5")
        assert frame(shown) == ""  # validation's lines are the epoch's; the next bar waits for its first step
        print("a library's own line")  # stdout is this terminal: it goes above the bar too
        shown.step(step(1, 10, loss=float("nan")))  # a task without a loss
        now = frame(shown)
        assert now.startswith("epoch 2/3 ━") and now.endswith(UNKNOWN_ETA) and "loss" not in now, now
    assert not printed(cons["out"])  # stdout is the same terminal: its lines go above the bar
    lines = [line for line in printed(cons["err"]) if line.startswith(("epoch", "a library"))]  # not GC noise
    # the epoch's line stays, then the last bar as it was left
    assert lines[:2] == ["epoch 1/3  train_loss 0.4  val_loss 0.5", "a library's own line"], lines
    assert len(lines) == 3 and lines[2].startswith("epoch 2/3 ━")  # no line for the logged steps: the bar


def test_a_log_gets_one_line_per_logged_step_and_the_epoch_lines():
    cons = consoles(False)
    with EpochProgress(2, **cons) as shown:
        assert shown.bar is None
        for epoch in range(2):
            for n in range(1, 21):
                shown.step(step(epoch, n, log_every=5, steps=20))
            shown.ended(f"[bold]epoch {epoch + 1}/2[/]  train_loss 0.4")
    lines = printed(cons["out"])
    assert lines == [*(f"step {n}/20 of epoch 1/2  2,346 samples/s  loss 0.4123" for n in (5, 10, 15, 20)),
                     "epoch 1/2  train_loss 0.4",
                     *(f"step {n}/20 of epoch 2/2  2,346 samples/s  loss 0.4123" for n in (5, 10, 15, 20)),
                     "epoch 2/2  train_loss 0.4"]
    assert not printed(cons["err"])
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]  # as test_cli_e2e


def test_stdout_to_a_file_keeps_its_lines_while_the_terminal_has_the_bar():
    cons = consoles(False, err_terminal=True)
    with EpochProgress(1, **cons) as shown:
        feed(shown, [step(0, n, log_every=2) for n in (2, 4)])
        assert frame(shown).startswith("epoch 1/1 ━")
        assert not hasattr(sys.stdout, "rich_proxied_file")  # print()s go to the file, not onto the terminal
        shown.ended("epoch 1/1  train_loss 0.4")
    assert printed(cons["out"]) == ["epoch 1/1  train_loss 0.4"]


def test_rl_iterations_a_bar_on_a_terminal_a_line_each_in_a_log():
    def iterations(display: IterationProgress) -> None:
        for i in range(1, 4):
            m = {"iteration": i, "env_steps": 1000.0 * i, "steps_per_s": 1234.0, "return_mean": 20.0 + i}
            display.iteration(m, f"iter {i}  steps {1000 * i}")
            time.sleep(0.01)

    tty = consoles(True)
    with IterationProgress(60_000, 1000, **tty) as shown:
        iterations(shown)
        now = frame(shown)
    assert now.startswith("iteration 3/60 ━") and "3,000/60,000 env steps · 1,234 steps/s · return 23" in now, now
    assert ETA.search(now) and not printed(tty["out"]), now
    assert [line[:16] for line in printed(tty["err"])] == ["iteration 3/60 ━"]  # no lines: the bar, as it ended
    log = consoles(False)
    with IterationProgress(2500, 1000, **log) as shown:
        iterations(shown)
    assert printed(log["out"]) == ["iter 1  steps 1000", "iter 2  steps 2000", "iter 3  steps 3000"]


def tune_trials(n: int) -> list[Trial]:
    return [Trial("trainable", config={}, trial_id=f"t{i}", stub=True) for i in range(n)]


def report(callback: engine.MlflowSweepCallback, trials: list[Trial], trial: Trial, epoch: int, loss: float) -> None:
    """Tune's order: the trial's last result is set, then the callbacks see it."""
    result = {"epoch": float(epoch), "val_loss": loss, "training_iteration": epoch + 1}
    trial.update_last_result(result)
    callback.on_trial_result(0, trials, trial, result)


def drive_sweep(callback: engine.MlflowSweepCallback, trials: list[Trial]) -> None:
    """A resumed sweep of four trials: one ended before; two start (Tune sets RUNNING after `on_trial_start`)
    and report two epochs each."""
    trials[3].set_status(Trial.TERMINATED)
    for trial in trials[:2]:
        callback.on_trial_start(0, trials, trial)
        trial.set_status(Trial.RUNNING)
    for epoch in range(2):
        for trial, loss in zip(trials[:2], (0.5, 0.25), strict=True):
            report(callback, trials, trial, epoch, loss - 0.1 * epoch)
            time.sleep(0.01)


def test_tune_shows_trials_done_running_and_the_best_so_far():
    for terminal in (True, False):
        cons = consoles(terminal)
        callback = engine.MlflowSweepCallback("sqlite:///unused.db", "sweep", f"parent-{terminal}", "train", True)
        with TrialProgress(4, 3, "val_loss", "min", **cons) as shown:
            engine.DISPLAYS[callback.parent_run_id] = shown
            try:
                drive_sweep(callback, tune_trials(4))
            finally:
                del engine.DISPLAYS[callback.parent_run_id]
            now = frame(shown) if terminal else ""
            shown.result("trial t1 finished")
        if terminal:  # 3 of 12 iterations: the ended trial's 3, then 2 + 2 more reported
            assert now.startswith("trials 1/4 ━") and "2 running · best val_loss 0.15" in now, now
            assert ETA.search(now) and printed(cons["err"])[0] == "trial t1 finished", now
            assert not printed(cons["out"])
        else:
            assert printed(cons["out"]) == [
                f"trial {t} epoch {e}  val_loss {v:.4g}" for e, pair in ((1, (0.5, 0.25)), (2, (0.4, 0.15)))
                for t, v in zip(("t0", "t1"), pair, strict=True)] + ["trial t1 finished"]


def test_trial_counts_take_the_status_tune_sets_after_the_callback():
    trials = tune_trials(3)
    trials[0].set_status(Trial.TERMINATED)
    trials[1].set_status(Trial.RUNNING)
    trials[1].update_last_result({"training_iteration": 2})
    assert engine.trial_counts(trials) == (1, 1, 2)
    assert engine.trial_counts(trials, trials[2], Trial.RUNNING) == (1, 2, 2)
    assert engine.trial_counts(trials, trials[1], Trial.TERMINATED) == (2, 0, 0)


def test_the_eta_counts_down_at_the_bar_s_mean_rate():
    def eta(rate: float, updated_ago: float) -> str:
        task = Task(TaskID(0), "bar", 100, 40, _get_time=time.monotonic,
                    fields={"rate": rate, "at": time.monotonic() - updated_ago})
        return TimeLeft().render(task).plain

    assert eta(2.0, 0) == "0:00:30" and eta(2.0, 10) == "0:00:20"  # 60 left at 2 a second, counting down
    assert eta(2.0, 90) == "0:00:00" and eta(0.0, 0) == "-:--:--"  # late: zero, not negative; no rate yet
