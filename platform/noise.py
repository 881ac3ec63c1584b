"""Third-party warnings and log lines that a raycraft user can do nothing about, and hiding them: in this process
(`quiet`, which the command line calls unless `raycraft --verbose`) and in every Ray worker it starts (`cluster`
names `quiet` as the workers' setup hook while this process is quiet). Each is matched exactly, by its logger (or
its warning's category and module) and the start of its message; every other line, raycraft's own above all, is
shown as before. The standard library only: every Ray worker imports this module first."""

from __future__ import annotations

import logging
import os
import re
import warnings

LOGGED = (
    # Ray turns token authentication on for a local Ray and says so at each start; raycraft wants it on.
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray"),
    # RLlib says once per algorithm that it runs on its new API stack, which is the one raycraft is written for.
    ("ray.rllib.algorithms.algorithm_config", r"You are running \w+ on the new API stack!"),
    # Every RLModule's constructor, RLlib's own included, builds RLlib's deprecated RLModuleConfig.
    ("ray._common.deprecation", r"DeprecationWarning: `RLModule\(config=\[RLModuleConfig object\]\)`"),
    # Ray Train's controller when a busy machine delays its resource request by seconds ("safe to ignore").
    ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
     "Failed to send resource request for "),
    # MLflow creating the tables of a new SQLite store.
    ("mlflow.store.db.utils", "(Creating initial MLflow database tables|Updating database tables)"),
)
"""(logger, regular expression matched at the start of the message) of each log line hidden."""

WARNED = (
    # RLlib registers its env wrapper with gymnasium again for each env runner it makes.
    (UserWarning, r"gymnasium\.envs\.registration", r".*WARN: Overriding environment rllib-single-agent-env-v0 "),
)
"""(category, module, message) of each `warnings.warn` hidden, as `warnings.filterwarnings` takes them."""

ENVIRONMENT = {"RAY_AIR_NEW_OUTPUT": "0"}
"""Variables set (unless the user set them): Ray Tune's newer console output prints its settings and folders to
stdout whatever its verbosity; the older one, at raycraft's verbosity 0, prints nothing."""

WORKER_HOOK = f"{__name__}.quiet"  # a Ray worker's setup hook, by name


class Hidden(logging.Filter):
    """Drops the records of one logger whose message starts as `pattern` says."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet() -> None:
    """Hide, in this process, the lines of `LOGGED` and `WARNED`, and set `ENVIRONMENT`. Idempotent."""
    if is_quiet():
        return
    for name, pattern in LOGGED:
        logging.getLogger(name).addFilter(Hidden(pattern))
    for category, module, message in WARNED:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def is_quiet() -> bool:
    """Whether `quiet` ran in this process."""
    return any(isinstance(f, Hidden) for f in logging.getLogger(LOGGED[0][0]).filters)
