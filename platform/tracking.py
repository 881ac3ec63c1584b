"""MLflow tracking: where runs go, the one object that owns a run while a process works on it (`Run`), and the
store-level queries (runs of an experiment, a run, its artifacts, runs whose client died).

Default store: `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlartifacts`; `--tracking-uri` or
`MLFLOW_TRACKING_URI` point elsewhere (a tracking server). Paths are made absolute because Ray workers
run in their own folders. The driver starts or resumes a run, holds it (`Run.heartbeat`) and ends it; only
rank 0 of the workers logs epochs and artifacts, through its own `Run` of the same id.

Who holds a run: while a process works on it, the run is tagged with that process (host, pid, process start)
and a heartbeat every `HEARTBEAT_S`, so `reap` can tell a run whose client died (SIGKILL, power loss) from one
still working, and mark it KILLED. `raycraft runs` and every new run on the store call `reap`. A sweep's trials
belong to the sweep's run: they have no heartbeat of their own and are reaped with it.

Nothing else in raycraft talks to MLflow's client: every write and query goes through this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from raycraft import storage
from raycraft.errors import UserError
from raycraft.extras import require_extra
from raycraft.lifecycle import ended_by, process_start_time

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
EPOCH_KEY = "epoch"  # logged at step = epoch; its history says which epochs MLflow already holds
GLOBAL_STEP = "global_step"  # a logged training step's marker, at step = that step (`log_every_steps`)
RESTORES_TAG = "raycraft.restored_at_epochs"  # comma-separated: the first epoch of each restart from a checkpoint
COMPLETED_TAG = "raycraft.completed"  # rank 0 logged everything (test metrics, plots, model) before its last report
ERROR_TAG = "raycraft.error"  # why a run ended FAILED or KILLED
DIVERGED_TAG = "raycraft.diverged"  # why the loop stopped an attempt whose values went non-finite or exploded
FAILED_RESUME_TAG = "raycraft.failed_resume"  # why a resume of a FINISHED run failed (the run stays FINISHED)
STATUS_TAG = "raycraft.status"
CLIENT_TAG = "raycraft.client"  # host:pid:process start time of the process that holds the run
HEARTBEAT_TAG = "raycraft.heartbeat"  # Unix time of the holder's latest heartbeat
PARENT_TAG = "mlflow.parentRunId"  # a sweep's (or scaling search's) trial: the run it belongs to
HEARTBEAT_S = 30.0
STALE_S = 4 * HEARTBEAT_S  # a holder on another host is taken for dead after this long without a beat
MAX_TEXT = 5000  # characters of a reason kept in a tag
BATCH = {"params": 100, "metrics": 1000, "tags": 100}  # MLflow's limits per log_batch call


def _mlflow():
    """MLflow, imported here and nowhere else."""
    import mlflow  # 1.5 s: deferred to the first store opened, so commands that open none start fast

    logging.getLogger("botocore").setLevel(logging.WARNING)  # an S3 artifact store's INFO lines on every upload
    return mlflow


def resolve_tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri.removeprefix('sqlite:///')).resolve()}"
    elif "://" not in uri:  # a bare folder: MLflow's file store
        uri = str(Path(uri).resolve())
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/"))


UI_HOST, UI_PORT = "127.0.0.1", 5000  # where `ui_command`'s `mlflow ui` serves a local store


def ui_command(uri: str, run_id: str | None = None) -> str:
    """How to see the store `uri` (and run `run_id` in it): for a local store, the `mlflow ui` command that serves
    it, then the run's page at that server's address; for a tracking server, the run's page on it."""
    server = f"http://{UI_HOST}:{UI_PORT}" if is_local_store(uri) else uri.rstrip("/")
    page = f"{server}/#/experiments/{get_run(uri, run_id).info.experiment_id}/runs/{run_id}" if run_id else server
    if is_local_store(uri):
        return f"mlflow ui --backend-store-uri {uri} --host {UI_HOST} --port {UI_PORT}, then open {page}"
    return f"open {page}"


_OPENED: set[str] = set()


def _client(uri: str):
    if uri.startswith("sqlite:") and uri not in _OPENED:
        open_sqlite_store(uri)
        _OPENED.add(uri)
    return _mlflow().MlflowClient(tracking_uri=uri)


def open_sqlite_store(uri: str) -> None:
    """Open (on first use: create and migrate) a SQLite store while holding an exclusive lock on its folder.
    MLflow migrates a new database's schema on first use, and two processes doing that at once can leave it
    broken for good; under the lock the second finds it ready. A store that cannot be opened is a UserError."""
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _mlflow().tracking._tracking_service.utils._get_store(uri)
    except Exception as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--tracking-uri: the MLflow store {db} cannot be opened ({problem}). If it is damaged, "
                        f"move it aside (`mv {db} {db}.broken`; its runs stay in that file) and run again, or "
                        "pass another --tracking-uri.") from None
    finally:
        os.close(fd)


def _batches(kind: str, items: list) -> list[list]:
    size = BATCH[kind]
    return [items[i:i + size] for i in range(0, len(items), size)]


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- the store: queries, and runs whose client died ---------------------------------------------------------


def experiment_id(uri: str, name: str, artifact_root: str | None = None) -> str:
    """The experiment's id, creating it if needed with its artifacts under `artifact_root` (a folder or URI; by
    default beside a local database, or where a tracking server puts them). An experiment that exists keeps its
    artifact location: a different `artifact_root` for it is a UserError, not a silent change of place."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    location = artifact_location(artifact_root) if artifact_root else None
    if exp is not None:
        if location and exp.artifact_location.rstrip("/") != location.rstrip("/"):
            raise UserError(f"artifact_root: experiment {name!r} keeps its artifacts at "
                            f"{storage.redact(exp.artifact_location)}, not {storage.redact(artifact_root)}; name "
                            "a new experiment (--set experiment=NAME) for the new place.")
        return exp.experiment_id
    if location is None and uri.startswith("sqlite:"):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def artifact_location(artifact_root: str) -> str:
    """`artifact_root` as MLflow's artifact location: a URI as given, a folder as its absolute file:// URI."""
    return artifact_root if storage.is_remote(artifact_root) else Path(artifact_root).resolve().as_uri()


def check_artifact_root(artifact_root: str) -> None:
    """Before anything starts: `artifact_root` can be written, and MLflow has the client its scheme needs
    (boto3 for s3://, which reads the same AWS_* variables as raycraft.storage)."""
    if artifact_root.startswith("s3://"):
        require_extra("s3", f"artifact_root: {storage.redact(artifact_root)}")
    storage.check_writable("artifact_root", artifact_root)


def experiments(uri: str) -> dict[str, str]:
    """{experiment id: name} of every experiment in the store."""
    return {e.experiment_id: e.name for e in _client(uri).search_experiments()}


def search_runs(uri: str, experiment: str | None = None, query: str = "", *, max_results: int = 10000,
                newest_first: bool = False) -> list:
    """Runs of the experiment named `experiment` (None: of every experiment) that match the MLflow filter
    `query`, oldest first (or the newest `max_results` first); none for an experiment that does not exist."""
    ids = list(experiments(uri)) if experiment is None else [
        i for i, name in experiments(uri).items() if name == experiment]
    if not ids:
        return []
    order = f"attributes.start_time {'DESC' if newest_first else 'ASC'}"
    return list(_client(uri).search_runs(ids, query, max_results=max_results, order_by=[order]))


def get_run(uri: str, run_id: str):
    """The run as the store has it now; a UserError when there is none of that id."""
    try:
        return _client(uri).get_run(run_id)
    except _mlflow().exceptions.MlflowException:
        raise UserError(f"RUN_ID: no MLflow run {run_id!r} in {uri}.") from None


def metric_history(uri: str, run_id: str, key: str) -> list:
    """Every value logged for `key` (each with its `.step` and `.value`)."""
    return list(_client(uri).get_metric_history(run_id, key))


def download_text(uri: str, run_id: str, path: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        local = _client(uri).download_artifacts(run_id, path, tmp)
        return Path(local).read_text()


def download_artifact(uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    """A run's artifact file or folder, copied under `dst`; a UserError when the run does not have it."""
    try:
        return Path(_client(uri).download_artifacts(run_id, path, str(dst)))
    except (_mlflow().exceptions.MlflowException, OSError):
        raise UserError(f"RUN_ID: run {run_id!r} has no artifact {path!r} (did it finish?).") from None


def load_model(uri: str, run_id: str):
    mlflow = _mlflow()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pytorch.load_model(f"runs:/{run_id}/model", map_location="cpu")
    except Exception as exc:
        raise UserError(f"RUN_ID: run {run_id!r} has no loadable model ({type(exc).__name__}: {exc}).") from None


def client_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{process_start_time():.2f}"


def holder_alive(client: str, heartbeat: float, now: float) -> bool:
    """Whether the process named by a CLIENT_TAG still holds its run: on this host, by its pid and start time
    (a reused pid is another process); elsewhere, by a heartbeat newer than STALE_S."""
    host, _, rest = client.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname():
        return now - heartbeat < STALE_S
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 1.0
    except (psutil.Error, ValueError):
        return False


def reap(uri: str) -> list[str]:
    """Mark KILLED every RUNNING run (and its RUNNING trials) whose holder is gone, ending it at its last
    heartbeat with the reason in ERROR_TAG; returns their ids."""
    now = time.time()
    running = search_runs(uri, query="attributes.status = 'RUNNING'", max_results=5000)
    dead = [r for r in running if CLIENT_TAG in r.data.tags and PARENT_TAG not in r.data.tags
            and not holder_alive(r.data.tags[CLIENT_TAG], float(r.data.tags.get(HEARTBEAT_TAG, 0)), now)]
    reaped = []
    for run in dead:
        beat = float(run.data.tags.get(HEARTBEAT_TAG, now))
        reason = (f"its client ({run.data.tags[CLIENT_TAG].rsplit(':', 1)[0]}) stopped without ending the run; "
                  f"last heartbeat {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(beat))}")
        for held in [run, *(r for r in running if r.data.tags.get(PARENT_TAG) == run.info.run_id)]:
            Run(uri, held.info.run_id).end("KILLED", reason, end_time=int(beat * 1000))
            reaped.append(held.info.run_id)
    return reaped


# --- one run ------------------------------------------------------------------------------------------------


class Run:
    """One MLflow run while this process works on it: `Run.start` creates one, `Run.resume` reopens one to
    continue it, `Run(uri, run_id)` is a handle on one that exists (rank 0 of a training's workers logging
    into the driver's run, a sweep ending the runs of trials its scheduler stopped). It logs metrics (each
    epoch at most once), tags and artifacts, holds the run while this process works on it (`heartbeat`), and
    ends it: FINISHED, or FAILED or KILLED with the reason, where a failed resume of a FINISHED run keeps
    that record."""

    def __init__(self, uri: str, run_id: str, before: Any = None) -> None:
        self.uri, self.run_id, self.client = uri, run_id, _client(uri)
        self.before = before  # a resumed run's RunInfo before this attempt: how it had ended
        self.logged: dict[str, set[int]] = {}  # per marker key, the steps MLflow holds, read at first use

    @classmethod
    def start(cls, uri: str, experiment: str, name: str, params: dict[str, Any], tags: dict[str, str],
              config_yaml: str) -> Run:
        """A new RUNNING run of `experiment` with its params, tags and config.yaml. Runs whose client died stay
        RUNNING until someone looks: every new run does (`reap`)."""
        reap(uri)
        mlflow = _mlflow()
        created = _client(uri).create_run(experiment_id(uri, experiment), run_name=name,
                                          tags={"mlflow.runName": name, **tags})
        run = cls(uri, created.info.run_id)
        for batch in _batches("params", [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]):
            run.client.log_batch(run.run_id, params=batch)
        run.log_text(config_yaml, "config.yaml")
        run.set_tags({STATUS_TAG: "running"})
        return run

    @classmethod
    def resume(cls, uri: str, run_id: str) -> Run:
        """Mark the run RUNNING again to continue it; why it ended before (ERROR_TAG, DIVERGED_TAG) goes."""
        before = get_run(uri, run_id)
        run = cls(uri, run_id, before.info)
        for tag in (ERROR_TAG, DIVERGED_TAG):
            if tag in before.data.tags:
                run.client.delete_tag(run_id, tag)
        run.client.update_run(run_id, status="RUNNING")
        return run

    def fetch(self):
        """The run as the store has it now (status, tags, latest metrics)."""
        return self.client.get_run(self.run_id)

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [_mlflow().entities.RunTag(k, str(v)) for k, v in tags.items()]
        for batch in _batches("tags", items):
            self.client.log_batch(self.run_id, tags=batch)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Figures at one `step` in one write: run-level ones (test metrics, start-up time, a sweep's counts)
        at 0, an RL iteration's at its env steps, a pruning round's at the round."""
        now, metric = _now_ms(), _mlflow().entities.Metric
        for batch in _batches("metrics", [metric(k, float(v), now, step) for k, v in metrics.items()]):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_epoch(self, metrics: dict[str, float]) -> bool:
        """One epoch's metrics (with EPOCH_KEY), at step = epoch, unless MLflow already holds that epoch: a
        restarted worker group logs again what its checkpoint's history holds. Whether it logged them."""
        return self._log_once(EPOCH_KEY, metrics)

    def log_step(self, metrics: dict[str, float]) -> bool:
        """One logged training step's metrics (with GLOBAL_STEP), at step = that step, at most once, as epochs."""
        return self._log_once(GLOBAL_STEP, metrics)

    def _log_once(self, marker: str, metrics: dict[str, float]) -> bool:
        if marker not in self.logged:
            self.logged[marker] = {int(m.step) for m in metric_history(self.uri, self.run_id, marker)}
        step = int(metrics[marker])
        if step in self.logged[marker]:
            return False
        # The marker goes last: a crash between the two leaves the step unmarked, so it is logged again whole.
        self.log_metrics({k: v for k, v in metrics.items() if k != marker}, step)
        self.log_metrics({marker: step}, step)
        self.logged[marker].add(step)
        return True

    def note_restore(self, epoch: int) -> None:
        """Append `epoch` (where a restarted worker group picked up) to the run's RESTORES_TAG."""
        before = self.fetch().data.tags.get(RESTORES_TAG)
        self.set_tags({RESTORES_TAG: f"{before},{epoch}" if before else str(epoch)})

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_model(self, model, example_input) -> None:
        """The final model through `mlflow.pytorch`, with a signature inferred from a real batch."""
        import torch  # 1.3 s: only rank 0's final log needs it, and `raycraft runs` must not pay for it

        mlflow = _mlflow()
        model = model.eval()
        with torch.no_grad():
            output = model(example_input)
        example = example_input.cpu().numpy()
        signature = mlflow.models.infer_signature(example, output.detach().cpu().numpy())
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            # MLflow's default 'pt2' format is a torch.export graph (no pickle); a batch of > 1 in the
            # example keeps the batch dimension dynamic.
            mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

    def heartbeat(self) -> Heartbeat:
        """While entered, this process holds the run (see `Heartbeat`). A sweep's trial has no heartbeat of
        its own: it is reaped with its sweep's run."""
        return Heartbeat(self, enabled=PARENT_TAG not in self.fetch().data.tags)

    def end(self, status: str = "FINISHED", reason: str = "", end_time: int | None = None) -> None:
        """status: FINISHED, FAILED or KILLED; the reason for a FAILED or KILLED end is kept in ERROR_TAG. A
        resumed run that had FINISHED keeps that record (status and end time) when this attempt does not
        finish, and the failed attempt is noted in FAILED_RESUME_TAG."""
        if status != "FINISHED" and self.before is not None and self.before.status == "FINISHED":
            self.set_tags({FAILED_RESUME_TAG: reason[:MAX_TEXT]})
            self.client.set_terminated(self.run_id, "FINISHED", end_time=self.before.end_time)
            return
        if reason:
            self.set_tags({ERROR_TAG: reason[:MAX_TEXT]})
        self.client.set_terminated(self.run_id, status, end_time=end_time)

    def end_with(self, exc: BaseException) -> str:
        """End the attempt that `exc` stopped (KILLED for a signal, else FAILED; `lifecycle.ended_by`), unless
        another process ended the run first (a sweep ends the runs of trials its scheduler stopped, KILLED);
        returns the status `exc` means."""
        status, reason = ended_by(exc)
        if self.fetch().info.status == "RUNNING":
            self.end(status, reason)
        return status


class Heartbeat:
    """While entered: the run's CLIENT_TAG names this process, and HEARTBEAT_TAG is renewed every HEARTBEAT_S
    (on a thread of its own), so that `reap` can tell whether the run's client died."""

    def __init__(self, run: Run, enabled: bool = True) -> None:
        self.run, self.enabled = run, enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a busy store delays a beat; the next one comes
                self.run.set_tags({HEARTBEAT_TAG: f"{time.time():.0f}"})

    def __enter__(self) -> Heartbeat:
        if self.enabled:
            self.run.set_tags({CLIENT_TAG: client_id(), HEARTBEAT_TAG: f"{time.time():.0f}"})
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
