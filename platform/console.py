"""The terminal side every command shares: two rich consoles (results on stdout, messages and progress on
stderr), progress bars (a plain one, and the live displays of training epochs, RL iterations and sweep
trials), the typer option types several commands declare alike, and what the entry point tells a command
about its invocation. Light on purpose: the command line imports it before anything heavy."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from raycraft.config import field_at

CONSOLE_ARGS = ({"soft_wrap": True}, {"stderr": True, "soft_wrap": True})
console, err_console = (Console(**kwargs) for kwargs in CONSOLE_ARGS)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: key=value (repeatable).")]
TrackingOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).")]
AddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a private local Ray).")]


def format_number(value: float) -> str:
    """A figure as every line of raycraft's output shows it: four significant digits (0.9753, 12.35, 0.0001235),
    thousands separated and no exponent from 1,000 up (12,346), an exponent below 0.0001 (1.235e-05), whole
    numbers as they are (3, 60,000)."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    short = f"{value:.4g}"
    return f"{value:,.0f}" if abs(float(short)) >= 1000 else short


def format_metrics(metrics: dict[str, float]) -> str:
    """Metrics as `name value` pairs by name, each value through `format_number`."""
    return "  ".join(f"{k} {format_number(v)}" for k, v in sorted(metrics.items()))


def field_option(cls: type, key: str, *names: str) -> Any:
    """The annotation of a command's option that sets field `key` (dotted: `data.data_dir`) of config
    dataclass `cls`, with the field's type and, as its help, the field's documentation, so neither is written
    twice. Its default is None: a flag not given leaves the key to the config's other layers. `names`: the
    option's names (typer's default: the parameter's name, dashed)."""
    field, tp = field_at(cls, key)
    return Annotated[Optional[tp], typer.Option(*names, help=field.metadata["help"])]


@dataclass(frozen=True)
class Invocation:
    """What the entry point passes a command as typer's `ctx.obj`."""

    started_at: float | None = None
    """When the user's command began, if before this process did (a warm fork runs for a caller that started
    earlier); None: when this process started."""


def redetect_terminal() -> None:
    """Re-detect the terminal (colour, width) in place: a warm fork writes to its caller's terminal, not to the
    one its parent started with, and every module holds these two console objects."""
    for each, kwargs in zip((console, err_console), CONSOLE_ARGS, strict=True):
        each.__init__(**kwargs)


@contextlib.contextmanager
def progress_bar(label: str, total: int, show: bool = True) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr, so stdout keeps only the command's output; yields `advance(n done)`, or
    None (and shows nothing) unless `show`."""
    if not show:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


class TimeLeft(ProgressColumn):
    """The time left at the bar's mean rate since it started (its `rate` field, measured at time `at`),
    counting down between updates. rich's own column measures a recent window, which a burst of updates
    (two trials ending together) fools."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate", 0.0)
        if not rate or task.total is None:
            return Text("-:--:--", style="progress.remaining")
        left = max(0.0, (task.total - task.completed) / rate - (time.monotonic() - task.fields["at"]))
        return Text(str(timedelta(seconds=round(left))), style="progress.remaining")


class LiveProgress:
    """A live bar on stderr where stderr is an interactive terminal (rich's detection, which a warm process
    redoes for its caller's terminal), and the lines printed around it. Elsewhere (CI, pipes, `raycraft
    submit` logs) there is no bar: `note` prints each of its plain lines instead, so a log gets one line per
    log interval and no redraws."""

    def __init__(self, out: Console | None = None, err: Console | None = None) -> None:
        self.out, self.err = out or console, err or err_console
        self.bar: Progress | None = None
        if self.err.is_interactive:
            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                       TextColumn("· ETA"), TimeLeft())
            # print()s go above the bar when stdout is this terminal too; to stdout's pipe or file otherwise
            self.bar = Progress(*columns, console=self.err, redirect_stdout=self.out.is_terminal)
        self.task: TaskID | None = None
        self.since = (0.0, 0.0)

    def __enter__(self) -> LiveProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def show(self, label: str, done: float, total: float, detail: str, restart: bool = False) -> None:
        """Move the bar to `done` of `total` (a new bar with `restart`, whose ETA forgets the old one's rate)."""
        if self.bar is None:
            return
        if restart and self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        now = time.monotonic()
        if self.task is None:  # its rate counts from `done`: a resumed run's first jump is no speed
            self.since = (now, done)
            self.task = self.bar.add_task(label, total=total, completed=done, detail=detail)
            self.bar.start()
        rate = (done - self.since[1]) / (now - self.since[0]) if now > self.since[0] else 0.0
        self.bar.update(self.task, description=label, total=total, completed=done, detail=detail, visible=True,
                        rate=rate, at=now)

    def hide(self) -> None:
        """Hide the bar now, so the line printed next does not come above its stale last frame."""
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, visible=False, refresh=True)

    def result(self, text: str) -> None:
        """A line of the command's output: stdout, printed above the bar when stdout is this terminal too."""
        (self.err if self.bar is not None and self.out.is_terminal else self.out).print(text)

    def note(self, text: str) -> None:
        """A progress line, printed (to stdout, with the results it leads to) only where there is no bar."""
        if self.bar is None:
            self.out.print(text)


class EpochProgress(LiveProgress):
    """`raycraft train`'s display: a bar per epoch fed by the run's step events (`runner.run_training`'s
    `on_step`), and each epoch's summary line as it ends."""

    def __init__(self, epochs: int, **consoles: Console) -> None:
        super().__init__(**consoles)
        self.epochs, self.epoch = epochs, None

    def step(self, event: dict[str, Any]) -> None:
        """On a terminal, the bar: epoch 3/10 ━━━━ 120/469 steps · 2,345 samples/s · loss 0.412 · ETA 0:00:31;
        elsewhere, a line for each event that was logged (a `log_every_steps` boundary)."""
        where = f"epoch {event['epoch'] + 1}/{self.epochs}"
        loss = event.get("loss")
        figures = [f"{event['samples_per_s']:,.0f} samples/s"] + (  # a loss of NaN: the step has none
            [f"loss {format_number(loss)}"] if loss is not None and not math.isnan(loss) else [])
        steps = f"{event['step']}/{event['steps']}"
        self.show(where, event["step"], event["steps"], " · ".join([f"{steps} steps", *figures]),
                  restart=event["epoch"] != self.epoch)
        self.epoch = event["epoch"]
        if event.get("log"):
            self.note(f"step {steps} of {where}  " + "  ".join(figures))

    def ended(self, line: str) -> None:
        """An epoch's summary `line`; its bar goes until the next epoch's first step."""
        self.hide()
        self.result(line)


class IterationProgress(LiveProgress):
    """`raycraft rl`'s display: a bar over the env steps to `timesteps`, named by the iteration out of the
    most there can be (`steps_per_iter` each, fewer if `stop_reward` ends it first)."""

    def __init__(self, timesteps: int, steps_per_iter: int, **consoles: Console) -> None:
        super().__init__(**consoles)
        self.timesteps, self.iterations = timesteps, -(-timesteps // steps_per_iter)

    def iteration(self, m: dict[str, float], line: str) -> None:
        """On a terminal, the bar: iteration 12/60 ━━━ 12,000/60,000 env steps · 1,234 steps/s · return 21.5
        · ETA 0:00:40; elsewhere, `line`."""
        i, steps = int(m["iteration"]), int(m["env_steps"])
        detail = [f"{steps:,}/{self.timesteps:,} env steps", f"{m.get('steps_per_s', 0):,.0f} steps/s"]
        detail += [f"{label} {format_number(m[key])}"
                   for key, label in (("return_mean", "return"), ("eval_return_mean", "eval")) if key in m]
        self.show(f"iteration {i}/{max(i, self.iterations)}", min(steps, self.timesteps), self.timesteps,
                  " · ".join(detail))
        self.note(line)


class TrialProgress(LiveProgress):
    """`raycraft tune`'s display: one bar over the sweep's trial iterations (`length` per trial, `trials`
    trials), naming trials done and running and the best `metric` (by `mode`) of the trials' latest reports."""

    def __init__(self, trials: int, length: int, metric: str, mode: str, **consoles: Console) -> None:
        super().__init__(**consoles)
        self.trials, self.length, self.metric, self.mode = trials, length, metric, mode
        self.latest: dict[str, float] = {}

    def reported(self, trial_id: str, metrics: dict[str, Any]) -> None:
        """A trial's report, whose `metric` (if it has it) is now the trial's."""
        if isinstance(metrics.get(self.metric), (int, float)):
            self.latest[trial_id] = float(metrics[self.metric])

    def count(self, done: int, running: int, progressed: float) -> None:
        """`done` trials ended, `running` running, `progressed`: iterations reported by trials not done."""
        total = self.trials * self.length
        best = (min if self.mode == "min" else max)(self.latest.values()) if self.latest else None
        detail = [f"{running} running", f"best {self.metric} " + ("-" if best is None else format_number(best))]
        self.show(f"trials {done}/{self.trials}", min(done * self.length + progressed, total), total,
                  " · ".join(detail))
