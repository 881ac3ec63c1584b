"""User-facing errors: raised before any Ray job starts, printed by the CLI without a traceback (exit 2)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user. The message names the field, the bad value and the valid choices."""


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
