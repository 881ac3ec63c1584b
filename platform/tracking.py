"""MLflow tracking: where runs go, how each epoch is logged exactly once, and the logged model.

Default store: `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlartifacts`; `--tracking-uri` or
`MLFLOW_TRACKING_URI` point elsewhere (a tracking server). Paths are made absolute because Ray workers
run in their own folders. The driver creates and ends runs and logs the model; only rank 0 of the
workers logs metrics and artifacts, through `RunLogger`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
EPOCH_KEY = "epoch"  # logged at step = epoch; its history says which epochs MLflow already holds
RESTORES_TAG = "raycraft.restored_at_epochs"  # comma-separated: the first epoch of each restart from a checkpoint
TUNE_ALLOWED_TAG = "raycraft.tune_allowed_epoch"  # a sweep trial: the last epoch its scheduler let it go past
COMPLETED_TAG = "raycraft.completed"  # rank 0 logged everything (test metrics, plots, model) before its last report
ERROR_TAG = "raycraft.error"  # why a run ended FAILED or KILLED
DIVERGED_TAG = "raycraft.diverged"  # why the loop stopped an attempt whose values went non-finite or exploded


def resolve_tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri.removeprefix('sqlite:///')).resolve()}"
    elif "://" not in uri:  # a bare folder: MLflow's file store
        uri = str(Path(uri).resolve())
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/"))


_OPENED: set[str] = set()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:") and uri not in _OPENED:
        open_sqlite_store(uri)
        _OPENED.add(uri)
    return MlflowClient(tracking_uri=uri)


def open_sqlite_store(uri: str) -> None:
    """Open (on first use: create and migrate) a SQLite store while holding an exclusive lock on its folder.
    MLflow migrates a new database's schema on first use, and two processes doing that at once can leave it
    broken for good; under the lock the second finds it ready. A store that cannot be opened is a UserError."""
    import fcntl

    from mlflow.tracking._tracking_service.utils import _get_store

    from raycraft.errors import UserError

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _get_store(uri)
    except Exception as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--tracking-uri: the MLflow store {db} cannot be opened ({problem}). If it is damaged, "
                        f"move it aside (`mv {db} {db}.broken`; its runs stay in that file) and run again, or "
                        "pass another --tracking-uri.") from None
    finally:
        os.close(fd)


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, creating it (with artifacts beside a local database) if needed."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
              config_yaml: str) -> str:
    from mlflow.entities import Param, RunTag

    from raycraft.lifecycle import reap

    reap(uri)  # runs whose client died stay RUNNING until someone looks: every new run does
    client = _client(uri)
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name,
                            tags={"mlflow.runName": run_name, **tags})
    run_id = run.info.run_id
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    client.log_text(run_id, config_yaml, "config.yaml")
    client.log_batch(run_id, tags=[RunTag("raycraft.status", "running")])
    return run_id


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_dir(uri: str, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    _client(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def reopen_run(uri: str, run_id: str):
    """Mark a run RUNNING again to continue it (an earlier end's reason goes); returns its RunInfo before."""
    client = _client(uri)
    run = client.get_run(run_id)
    for tag in (ERROR_TAG, DIVERGED_TAG):
        if tag in run.data.tags:
            client.delete_tag(run_id, tag)
    client.update_run(run_id, status="RUNNING")
    return run.info


def end_attempt(uri: str, run_id: str, status: str, reason: str, before=None) -> None:
    """End an attempt that did not finish (FAILED or KILLED, with the reason). A resumed run that had FINISHED
    (`before`: its RunInfo then) keeps that record, and the failed attempt is noted in a tag."""
    if before is not None and before.status == "FINISHED":
        set_tags(uri, run_id, {"raycraft.failed_resume": reason[:5000]})
        _client(uri).set_terminated(run_id, "FINISHED", end_time=before.end_time)
    else:
        end_run(uri, run_id, status, reason)


def end_run(uri: str, run_id: str, status: str, reason: str = "") -> None:
    """status: FINISHED, FAILED or KILLED. The reason for a FAILED or KILLED end is kept as a tag."""
    client = _client(uri)
    if reason:
        set_tags(uri, run_id, {ERROR_TAG: reason[:5000]})
    client.set_terminated(run_id, status=status)


def get_run(uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    from raycraft.errors import UserError

    try:
        return _client(uri).get_run(run_id)
    except MlflowException:
        raise UserError(f"RUN_ID: no MLflow run {run_id!r} in {uri}.") from None


def download_text(uri: str, run_id: str, path: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = _client(uri).download_artifacts(run_id, path, tmp)
        return Path(local).read_text()


def download_artifact(uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    """A run's artifact file or folder, copied under `dst`; a UserError when the run does not have it."""
    from mlflow.exceptions import MlflowException

    from raycraft.errors import UserError

    try:
        return Path(_client(uri).download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError):
        raise UserError(f"RUN_ID: run {run_id!r} has no artifact {path!r} (did it finish?).") from None


class RunLogger:
    """Rank 0's MLflow writer. Logs each epoch at most once: epochs already in MLflow are skipped."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client, self.uri, self.run_id = _client(uri), uri, run_id
        self.logged = {int(m.step) for m in self.client.get_metric_history(run_id, EPOCH_KEY)}

    def log_epoch(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        step = int(metrics[EPOCH_KEY])
        if step in self.logged:
            return
        now = int(time.time() * 1000)
        # EPOCH_KEY goes last: a crash mid-call leaves the epoch unmarked, so it is logged again whole.
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != EPOCH_KEY]
        self.client.log_batch(self.run_id, metrics=items)
        self.client.log_batch(self.run_id, metrics=[Metric(EPOCH_KEY, float(step), now, step)])
        self.logged.add(step)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def tune_allows(self, epoch: int, timeout_s: float = 600.0) -> bool:
        """A sweep trial after `epoch`: wait for Tune's scheduler. True once the sweep tags the run as allowed
        past `epoch`; False once the sweep has ended the run (the scheduler stopped the trial). Tune's
        reports do not block training, so without this wait a stopped trial would train on unseen (and
        even log test metrics) until its actors are killed. After `timeout_s` without word it goes on."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.client.get_run(self.run_id)
            if int(run.data.tags.get(TUNE_ALLOWED_TAG, "-1")) >= epoch:
                return True
            if run.info.status != "RUNNING":
                return False
            time.sleep(0.2)
        return True

    def note_restore(self, epoch: int) -> None:
        """Append `epoch` (where a restarted worker group picked up) to the run's RESTORES_TAG."""
        before = self.client.get_run(self.run_id).data.tags.get(RESTORES_TAG)
        self.set_tag(RESTORES_TAG, f"{before},{epoch}" if before else str(epoch))

    def log_model(self, model, example_input) -> None:
        """The final model through `mlflow.pytorch`, with a signature inferred from a real batch."""
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        model = model.eval()
        with torch.no_grad():
            output = model(example_input)
        example = example_input.cpu().numpy()
        signature = infer_signature(example, output.detach().cpu().numpy())
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            # MLflow's default 'pt2' format is a torch.export graph (no pickle); a batch of > 1 in the
            # example keeps the batch dimension dynamic.
            mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

    def log_history(self, history: list[dict[str, float]]) -> None:
        for metrics in history:
            self.log_epoch(metrics)

    def log_once(self, metrics: dict[str, float], step: int = 0) -> None:
        """Figures outside the epoch history (test metrics, start-up time; a pruning round's at `step`)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        log_dir(self.uri, self.run_id, local_dir, artifact_path)


def load_model(uri: str, run_id: str):
    import mlflow
    import mlflow.pytorch

    from raycraft.errors import UserError

    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pytorch.load_model(f"runs:/{run_id}/model", map_location="cpu")
    except Exception as exc:
        raise UserError(f"RUN_ID: run {run_id!r} has no loadable model ({type(exc).__name__}: {exc}).") from None


def ui_command(uri: str) -> str:
    if is_local_store(uri):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri}"
