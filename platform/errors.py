"""User-facing errors: raised before any Ray job starts, printed by the CLI without a traceback (exit 2)."""

from __future__ import annotations

import difflib
import signal
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user. The message names the field, the bad value and the valid choices."""


class TrainingError(RuntimeError):
    """The job started but did not finish (a worker kept failing, or the loss became NaN/Inf)."""


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived while a run was held. A BaseException, so no `except Exception` swallows it;
    `run_id` is set by the code that ended the run."""

    def __init__(self, signum: int, run_id: str | None = None) -> None:
        self.signum, self.run_id = signum, run_id
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)


def invalid_choice(field: str, value: object, choices: Iterable[str]) -> UserError:
    """`field` is not one of `choices`: say so, with the closest names first."""
    choices = sorted(choices)
    near = closest(str(value), choices)
    hint = f" Did you mean {', '.join(repr(c) for c in near)}?" if near else ""
    return UserError(f"{field}: {value!r} is not valid.{hint} Valid choices: {', '.join(choices)}.")


def check_count(field: str, value: int, maximum: int | None = None) -> None:
    """UserError unless the count `value` given for `field` is at least 1 (and at most `maximum`)."""
    if value < 1:
        raise UserError(f"{field}: {value} must be at least 1.")
    if maximum is not None and value > maximum:
        raise UserError(f"{field}: {value} is over the maximum of {maximum:,}.")
