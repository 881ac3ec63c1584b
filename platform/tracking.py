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

What a run says of itself: how it came about (`provenance`: user, command line, code, versions, host), the data
it trains on (`Run.log_datasets`), and at its end its logged model (`Run.logged_model`), which carries the run's
final metrics. Its status is MLflow's own; the process that holds it may log system metrics.

Nothing else in raycraft talks to MLflow's client: every write and query goes through this module.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import getpass
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
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
CLIENT_TAG = "raycraft.client"  # host:pid:process start time of the process that holds the run
HEARTBEAT_TAG = "raycraft.heartbeat"  # Unix time of the holder's latest heartbeat
PARENT_TAG = "mlflow.parentRunId"  # a sweep's (or scaling search's) trial: the run it belongs to
COMMAND_TAG = "raycraft.command"  # the command line that started the run (credentials in URIs hidden)
HOST_TAG = "raycraft.host"  # the machine of the process that started the run
TASK_TAG = "raycraft.task"  # "rl" on RL runs (`raycraft eval` and `rl-eval` tell them apart by it)
DIRTY_TAG = "raycraft.git_dirty"  # raycraft's git checkout had changes not committed ("true"/"false")
VERSION_PREFIX = "raycraft.version."  # + package: the installed version of each of VERSIONED
VERSIONED = ("raycraft", "torch", "ray", "mlflow")
GIT_TAGS = ("mlflow.source.git.commit", "mlflow.source.git.branch", DIRTY_TAG)
INVOCATION_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", COMMAND_TAG, *GIT_TAGS)
KIND_TAG = "mlflow.experimentKind"  # which view MLflow's UI opens an experiment in
KIND = "custom_model_development"  # its "Machine learning" view (runs, models), not GenAI's traces
CONTEXT_TAG = "mlflow.data.context"  # a dataset input's role in the run: the split ("train", "val", "test")
MODEL_NAME = "model"  # the logged model of a run: runs:/RUN_ID/model
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
    it, then the run's page at that server's address; for a tracking server, the run's page on it. The page opens
    in MLflow's "Model training" view (runs, models, system metrics): MLflow 3.17's UI takes the view from the link
    (`workflowType`), else from the user's last choice, GenAI at first, whatever the experiment's KIND_TAG says."""
    server = f"http://{UI_HOST}:{UI_PORT}" if is_local_store(uri) else uri.rstrip("/")
    page = server
    if run_id:
        experiment = get_run(uri, run_id).info.experiment_id
        page = f"{server}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
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


# --- provenance: who ran what, from which code, where -------------------------------------------------------


def provenance(parent: dict[str, str] | None = None) -> dict[str, str]:
    """The tags that say how a run came about: MLflow's own (the UI's "Created by", "Source" and git commit)
    and raycraft's: the command line (credentials in URIs hidden), the host, and the versions of Python and
    of VERSIONED, read from package metadata (no torch or Ray import). The git tags come only from a git
    checkout of raycraft (`git_provenance`). With `parent` (the tags of a sweep's run, for its trial, which a
    Ray process starts) the user, command and code are the parent's; host and versions are this process's."""
    versions = {f"{VERSION_PREFIX}python": sys.version.split()[0]}
    for package in VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[VERSION_PREFIX + package] = importlib.metadata.version(package)
    here = {HOST_TAG: socket.gethostname(), **versions}
    if parent is not None:
        return {**{k: v for k, v in parent.items() if k in INVOCATION_TAGS}, **here}
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name, no passwd entry (some containers)
        user = "unknown"
    return {"mlflow.user": user, "mlflow.source.name": " ".join(argv[:2]), "mlflow.source.type": "LOCAL",
            COMMAND_TAG: shlex.join(storage.redact(a) for a in argv)[:MAX_TEXT], **here, **git_provenance()}


def git_provenance(folder: Path = Path(__file__).resolve().parent) -> dict[str, str]:
    """The commit and branch of the git checkout `folder` (raycraft's code) is in, and whether it has changes
    not committed (files git ignores aside); none when git is missing or `folder` is not tracked in a checkout
    (an install in a virtualenv that lies inside some other project's checkout)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", ".").returncode:
            return {}
        head, status = git("rev-parse", "HEAD", "--abbrev-ref", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return {}
    if head.returncode or status.returncode or len(head.stdout.split()) != 2:
        return {}
    return dict(zip(GIT_TAGS, [*head.stdout.split(), str(bool(status.stdout.strip())).lower()], strict=True))


# --- the store: queries, and runs whose client died ---------------------------------------------------------


def experiment_id(uri: str, name: str, artifact_root: str | None = None) -> str:
    """The experiment's id, creating it if needed with its artifacts under `artifact_root` (a folder or URI; by
    default beside a local database, or where a tracking server puts them). An experiment that exists keeps its
    artifact location: a different `artifact_root` for it is a UserError, not a silent change of place. The
    experiment is of MLflow's machine-learning kind (KIND_TAG), which an existing one without a kind gets too."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    location = artifact_location(artifact_root) if artifact_root else None
    if exp is not None:
        if location and exp.artifact_location.rstrip("/") != location.rstrip("/"):
            raise UserError(f"artifact_root: experiment {name!r} keeps its artifacts at "
                            f"{storage.redact(exp.artifact_location)}, not {storage.redact(artifact_root)}; name "
                            "a new experiment (--set experiment=NAME) for the new place.")
        if KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
    if location is None and uri.startswith("sqlite:"):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
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
    """The torch network of a run's logged model, on CPU: a `mlflow.pytorch` model, or the `network` artifact
    of a classifier's pyfunc model, read as data: the pyfunc's own code (`raycraft.serving`, logged with the
    run) is never executed here, so evaluating a run runs only this installation's code."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{MODEL_NAME}", dst_path=tmp))
            flavors = mlflow.models.Model.load(local).flavors
            if "pytorch" not in flavors:
                local = local / flavors["python_function"]["artifacts"]["network"]["path"]
            return mlflow.pytorch.load_model(str(local), map_location="cpu")
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
        """A new RUNNING run of `experiment` with its params, tags (and `provenance`'s) and config.yaml. Runs
        whose client died stay RUNNING until someone looks: every new run does (`reap`)."""
        reap(uri)
        mlflow, client = _mlflow(), _client(uri)
        origin = provenance(client.get_run(tags[PARENT_TAG]).data.tags if PARENT_TAG in tags else None)
        created = client.create_run(experiment_id(uri, experiment), run_name=name,
                                    tags={"mlflow.runName": name, **origin, **tags})
        run = cls(uri, created.info.run_id)
        for batch in _batches("params", [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]):
            run.client.log_batch(run.run_id, params=batch)
        run.log_text(config_yaml, "config.yaml")
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

    def log_datasets(self, name: str, location: str | None, identity: dict[str, Any],
                     splits: Iterable[str]) -> None:
        """One MLflow dataset input per split of the data the run trains on, its CONTEXT_TAG the split: the run
        page lists them, and a logged model's metrics of a split (`<split>_*`) name theirs. Each is named
        `name`, its digest fixed by `identity` (what decides its contents: the reader's config) and the split;
        its source is `location` (a folder or URI, credentials hidden), or raycraft's reader of `name`."""
        entities = _mlflow().entities
        if location is None:
            source_type, source = "code", {"tags": {"raycraft.dataset": name}}
        else:
            remote = storage.is_remote(location)
            source_type = location.split("://", 1)[0] if remote else "local"
            source = {"uri": storage.redact(location) if remote else Path(location).resolve().as_uri()}
        inputs = []
        for split in splits:
            key = json.dumps({"dataset": name, "split": split, **identity}, sort_keys=True, default=str)
            data = entities.Dataset(name, hashlib.sha256(key.encode()).hexdigest()[:8], source_type,
                                    json.dumps(source))
            inputs.append(entities.DatasetInput(data, [entities.InputTag(CONTEXT_TAG, split)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_model(self, model, example_input, final: Iterable[str], classes: list[str] | None = None,
                  about: str = "") -> str:
        """The final torch model as the run's logged model (`logged_model`), exported for CPU by torch.export
        (MLflow's 'pt2' format, no pickle; an example batch of > 1 keeps the batch dimension dynamic). A
        classifier (`classes`: its class names) is served by `raycraft.serving`, answering labels, class names
        and probabilities; any other model by `mlflow.pytorch`, answering the network's output. `about`:
        what the model is and the input it expects. Returns the model's id."""
        import torch  # 1.3 s: only rank 0's final log needs it, and `raycraft runs` must not pay for it

        mlflow = _mlflow()
        model = copy.deepcopy(model).cpu().eval()
        example = example_input.detach().cpu().numpy()
        with torch.no_grad():
            output = model(torch.from_numpy(example)).detach().numpy()
        tensors = mlflow.models.infer_signature(example, output)
        pins = [f"torch=={torch.__version__.split('+')[0]}"]
        if classes is None:
            return self.logged_model(lambda model_id: mlflow.pytorch.log_model(
                model, name=MODEL_NAME, signature=tensors, input_example=example, pip_requirements=pins,
                metadata={"description": about}, model_id=model_id), final, about=about)
        from raycraft import serving  # its import runs MLflow's and torch's, deferred with them

        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pytorch.save_model(model, Path(tmp) / "network", signature=tensors, input_example=example,
                                      pip_requirements=pins)
            return self.log_pyfunc(Path(serving.__file__), {"network": str(Path(tmp) / "network")}, final,
                                   example, serving.answer(model, classes, example), params={"logits": False},
                                   config={"classes": classes}, about=f"{about} {serving.describe(classes)}",
                                   requirements=pins, model_type="classifier")

    def log_pyfunc(self, code: Path, artifacts: dict[str, str], final: Iterable[str], input_example: Any,
                   output_example: Any, *, params: dict[str, Any] | None = None,
                   config: dict[str, Any] | None = None, about: str = "", requirements: Iterable[str] = (),
                   model_type: str | None = None) -> str:
        """A model whose code is the Python file `code` (MLflow's "models from code": the file is logged, no
        object pickled), with `artifacts` {name: local path} and `config` (its model_config), as the run's
        logged model (`logged_model`), `about` its description (also in its MLmodel's metadata). Its signature
        is inferred from `input_example` (also logged), an `output_example` and `params` (each with its
        default). Returns the model's id."""
        mlflow = _mlflow()
        with warnings.catch_warnings():  # that an integer output (a class index) cannot be missing: it never is
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
            signature = mlflow.models.infer_signature(input_example, output_example, params)
        return self.logged_model(lambda model_id: mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(code), artifacts=artifacts, model_config=config,
            signature=signature, input_example=input_example, pip_requirements=list(requirements),
            metadata={"description": about}, model_id=model_id), final, about=about, model_type=model_type)

    def logged_model(self, save: Callable[[str], Any], final: Iterable[str], about: str = "",
                     model_type: str | None = None) -> str:
        """The run's logged model (MLflow 3's LoggedModel, named MODEL_NAME: `runs:/RUN_ID/model`), with the
        run's params and provenance tags, `about` as its description, and the run's metrics `final` (each key's
        last value, with the dataset of its split, `log_datasets`): what the model page shows. `save(model_id)`
        writes the model's files through a flavour's `log_model(..., model_id=model_id)`; with no active run
        MLflow links nothing itself (it would link the metrics logged at one step, by default the first
        epoch's). Returns the model's id."""
        mlflow, record = _mlflow(), self.fetch()
        tags = {k: v for k, v in record.data.tags.items() if k in INVOCATION_TAGS or k == HOST_TAG
                or k.startswith(VERSION_PREFIX)}
        created = self.client.create_logged_model(
            record.info.experiment_id, MODEL_NAME, self.run_id, {**tags, "mlflow.note.content": about[:MAX_TEXT]},
            record.data.params, model_type)
        mlflow.set_tracking_uri(self.uri)
        save(created.model_id)
        linked = self._final_metrics(created.model_id, final, record)
        step = max((m.step for m in linked), default=0)
        self.client.log_outputs(self.run_id, [mlflow.entities.LoggedModelOutput(created.model_id, step)])
        self.drop_older_models()
        return created.model_id

    def _final_metrics(self, model_id: str, keys: Iterable[str], record: Any) -> list:
        """Link each of `keys`' last logged value to the model `model_id` (logged again with the model's id,
        its step and time unchanged, so the run's history gains no point) with the dataset of its split."""
        datasets = {}
        for given in record.inputs.dataset_inputs if record.inputs else []:
            context = {t.key: t.value for t in given.tags}.get(CONTEXT_TAG)
            datasets[context] = given.dataset
        metric, linked = _mlflow().entities.Metric, []
        for key in keys:
            history = self.client.get_metric_history(self.run_id, key)
            if not history:
                continue
            last = max(history, key=lambda m: (m.step, m.timestamp))
            data = datasets.get(key.split("_", 1)[0])
            linked.append(metric(key, last.value, last.timestamp, last.step, model_id=model_id,
                                 dataset_name=data.name if data else None,
                                 dataset_digest=data.digest if data else None, run_id=self.run_id))
        for batch in _batches("metrics", linked):
            self.client.log_batch(self.run_id, metrics=batch)
        return linked

    def drop_older_models(self) -> None:
        """Delete the run's logged models called MODEL_NAME but the newest: `runs:/RUN_ID/model` loads the oldest
        of them, and a resumed run's final model supersedes those logged before."""
        experiment = self.fetch().info.experiment_id
        models = self.client.search_logged_models(
            experiment_ids=[experiment], filter_string=f"name = '{MODEL_NAME}' AND source_run_id = '{self.run_id}'")
        for model in sorted(models, key=lambda m: m.creation_timestamp)[:-1]:
            self.client.delete_logged_model(model.model_id)

    def heartbeat(self, system_metrics: bool = False) -> Heartbeat:
        """While entered, this process holds the run (see `Heartbeat`), and with `system_metrics` logs this
        machine's CPU, memory, disk, network and GPU use to it. A sweep's trial has no heartbeat of its own:
        it is reaped with its sweep's run."""
        return Heartbeat(self, enabled=PARENT_TAG not in self.fetch().data.tags, system_metrics=system_metrics)

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
    (on a thread of its own), so that `reap` can tell whether the run's client died. With `system_metrics`,
    MLflow's SystemMetricsMonitor samples the machine on a thread of its own (every 10 s, or
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) and logs `system/*` metrics, continuing a resumed run's steps;
    it stops on exit, before the run ends."""

    def __init__(self, run: Run, enabled: bool = True, system_metrics: bool = False) -> None:
        self.run, self.enabled, self.system_metrics = run, enabled, system_metrics and enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.monitor = None

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a busy store delays a beat; the next one comes
                self.run.set_tags({HEARTBEAT_TAG: f"{time.time():.0f}"})

    def __enter__(self) -> Heartbeat:
        if self.system_metrics:  # first: if it cannot start, no heartbeat thread outlives the failed `with`
            monitors = importlib.import_module("mlflow.system_metrics.system_metrics_monitor")
            logging.getLogger(monitors.__name__).setLevel(logging.WARNING)  # its start and stop INFO lines
            self.monitor = monitors.SystemMetricsMonitor(self.run.run_id, resume_logging=True,
                                                         tracking_uri=self.run.uri)
            self.monitor.start()
        if self.enabled:
            self.run.set_tags({CLIENT_TAG: client_id(), HEARTBEAT_TAG: f"{time.time():.0f}"})
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.monitor is not None:
            self.monitor.finish()
        if self.enabled:
            self.stop.set()
            self.thread.join()
