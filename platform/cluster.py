"""Ray for raycraft: starting a private local Ray or joining a cluster (`init_ray`), and the Ray Jobs API
client behind `raycraft submit` and `raycraft jobs` (whose commands are in `raycraft.cluster_commands`).

`submit` packs the project folder (minus virtualenvs, MLflow stores, checkpoints and caches) into the
job's `runtime_env` working_dir, passes the MLflow tracking URI on, runs `python -m raycraft.cli <command>`
on the cluster, streams its logs and exits with the job's exit code. Everything that can be wrong is
checked before anything is uploaded: the command, the address (a TCP connect with a timeout, so an
unreachable cluster fails in seconds), the tracking store (a laptop's SQLite file cannot be reached
from another node) and the package size.

Ray 2.60 token authentication: the Jobs client sends the token when `RAY_AUTH_MODE=token`; the token
comes from `RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
import sys
import tempfile
import time
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
from ray._private import ray_constants
from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from raycraft import noise
from raycraft.errors import UserError, invalid_choice
from raycraft.tracking import is_local_store, resolve_tracking_uri

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 3.0
# Never shipped with a job: environments, local MLflow stores, Ray results and checkpoints, caches.
EXCLUDES = [
    ".git", ".venv", "venv", ".env", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache",
    "mlflow.db", "*.db", "mlruns", "mlartifacts", "ray_results", "checkpoints", "*.ckpt", "*.pt", ".cache",
    "build", "dist", "node_modules",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AUTH_HELP = ("Token authentication (Ray 2.60): export RAY_AUTH_MODE=token and make the cluster's token available "
             "as ~/.ray/auth_token, the file named by RAY_AUTH_TOKEN_PATH, or RAY_AUTH_TOKEN; `ray get-auth-token` "
             "on the head node prints it.")


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname:
        raise UserError(f"--address: {address!r} is not an address; use http://HOST:PORT (the Ray dashboard) "
                        "or HOST:PORT (the GCS).")
    try:
        port = parsed.port or default_port
    except ValueError:
        raise UserError(f"--address: {address!r} has an invalid port.") from None
    return parsed.hostname, port


def check_reachable(address: str, default_port: int, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connect with a timeout: an unreachable or firewalled cluster fails in seconds, not minutes."""
    host, port = _host_port(address, default_port)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"--address: cannot reach the Ray cluster at {address!r} ({host}:{port}: "
                        f"{exc.strerror or exc}). Is the head node running, and is the port right?") from None


def dashboard_address(address: str | None) -> str:
    """The Jobs API URL: --address, else $RAY_API_SERVER_ADDRESS, else an http $RAY_ADDRESS, else localhost."""
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (os.environ.get("RAY_ADDRESS") if os.environ.get("RAY_ADDRESS", "").startswith("http") else None)
               or DEFAULT_DASHBOARD)
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address: {address!r}: submit talks to the Ray dashboard's Jobs API; give its "
                        f"http(s)://HOST:PORT (default port 8265), e.g. {DEFAULT_DASHBOARD}.")
    return address.rstrip("/")


def client(address: str | None):
    """A Jobs API client, after the reachability check; authentication failures become UserErrors."""
    url = dashboard_address(address)
    check_reachable(url, 8265)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as exc:
        raise UserError(f"--address: the cluster at {url} refused the token: {exc.message}. {AUTH_HELP}") from None
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(f"--address: {url} does not answer as a Ray Jobs API: {exc}") from None


def _calling(fn, *args):
    """Call the Jobs API; turn its auth and lookup failures into UserErrors."""
    try:
        return fn(*args)
    except AuthenticationError as exc:
        raise UserError(f"the cluster refused the token: {exc.message}. {AUTH_HELP}") from None
    except RuntimeError as exc:
        if args and ("404" in str(exc) or "does not exist" in str(exc)):
            raise UserError(f"JOB_ID: no job {args[0]!r} on this cluster (`raycraft jobs list`).") from None
        raise


# ---------------------------------------------------------------------------------------------- the command
def split_command(command: list[str], commands: Collection[str]) -> list[str]:
    """The raycraft command to run remotely, without a leading 'raycraft'; its name must be one of the
    command line's `commands` other than submit and jobs (which talk to the cluster from here)."""
    if command and command[0] == "raycraft":
        command = command[1:]
    if not command:
        raise UserError("submit: give the raycraft command to run after `--`, e.g. "
                        "`raycraft submit -- train lenet5 --dataset digits`.")
    names = [name for name in commands if name not in ("submit", "jobs")]
    if command[0] not in names:
        raise invalid_choice("submit COMMAND", command[0], names)
    return command


def option_value(command: list[str], name: str) -> str | None:
    for i, arg in enumerate(command):
        if arg == name and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def cluster_nodes(jobs_client) -> int:
    """Alive nodes, from the dashboard's state API."""
    r = jobs_client._do_request("GET", "/api/v0/nodes?limit=1000&filter_keys=state&filter_predicates=%3D"
                                       "&filter_values=ALIVE")
    r.raise_for_status()
    return len(r.json()["data"]["result"]["result"])


def check_tracking_uri(uri: str, dashboard_url: str, nodes: int) -> None:
    """A local MLflow store (SQLite file, folder) works only when every Ray node shares this machine."""
    host = urlparse(dashboard_url).hostname or ""
    local_cluster = host in ("127.0.0.1", "localhost", "::1") and nodes == 1
    if is_local_store(uri) and not local_cluster:
        where = f"{nodes} nodes" if nodes > 1 else f"a cluster at {host}"
        raise UserError(
            f"--tracking-uri: {uri!r} is a file on this machine; the job runs on {where}, whose workers cannot "
            "write to it. Start an MLflow tracking server that every node can reach, e.g. "
            "`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000 --workers 1` "
            "(or the k8s/ Deployment), and pass --tracking-uri http://HOST:5000 "
            "(or set MLFLOW_TRACKING_URI).")
    if uri.startswith(("http://127.0.0.1", "http://localhost")) and host not in ("127.0.0.1", "localhost"):
        raise UserError(f"--tracking-uri: {uri!r} is this machine's loopback; the cluster at {host} cannot reach "
                        "it. Give the tracking server's address as the cluster sees it.")


def package_limit() -> int:
    return int(os.environ.get("RAY_max_grpc_message_size", GCS_STORAGE_MAX_SIZE))


def package_project(project: Path, out_dir: Path) -> Path:
    """Zip `project` for the job's working_dir (honouring .gitignore/.rayignore and EXCLUDES); refuse one
    larger than the Jobs API accepts, naming the biggest files."""
    if not project.is_dir():
        raise UserError(f"--working-dir: {str(project)!r} is not a folder.")
    zip_path = out_dir / f"raycraft-{project.name or 'project'}.zip"
    create_package(str(project), zip_path, include_gitignore=True, excludes=EXCLUDES, logger=None)
    size, limit = zip_path.stat().st_size, package_limit()
    if size >= limit:
        with zipfile.ZipFile(zip_path) as z:
            biggest = sorted(z.infolist(), key=lambda i: -i.compress_size)[:3]
        names = ", ".join(f"{i.filename} ({i.compress_size / 2**20:.1f} MiB)" for i in biggest)
        raise UserError(f"--working-dir: {project} packs to {size / 2**20:.1f} MiB; the Ray Jobs API takes at most "
                        f"{limit / 2**20:.0f} MiB. Largest files: {names}. List what the job does not need in a "
                        ".rayignore file (same syntax as .gitignore), or put data in shared storage.")
    return zip_path


def with_option(command: list[str], name: str, value: str) -> list[str]:
    """`command` with option `name` set to `value` (replacing any value it had)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(command):
        if skip:
            skip = False
        elif arg == name:
            skip = i + 1 < len(command)
        elif not arg.startswith(name + "="):
            out.append(arg)
    return [*out, name, value]


def submit(command: list[str], commands: Collection[str], *, address: str | None, working_dir: Path, wait: bool,
           echo=print) -> tuple[str, int]:
    """Submit `raycraft <command>` (one of the command line's `commands`); returns (job id, exit code: the
    job's when waited for, else 0)."""
    command = split_command(command, commands)
    explicit = option_value(command, "--tracking-uri")
    jobs = client(address)
    url = dashboard_address(address)
    uri = resolve_tracking_uri(explicit)
    check_tracking_uri(uri, url, _calling(cluster_nodes, jobs))
    if explicit:  # made absolute here: the job runs in a copy of the project elsewhere
        command = with_option(command, "--tracking-uri", uri)
    entrypoint = shlex.join(["python", "-m", "raycraft", *command])
    with tempfile.TemporaryDirectory(prefix="raycraft-submit-") as tmp:
        zip_path = package_project(working_dir.resolve(), Path(tmp))
        job_id = _calling(lambda: jobs.submit_job(
            entrypoint=entrypoint, submission_id=f"raycraft-{command[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
                                                 f"-{os.urandom(3).hex()}",
            runtime_env={"working_dir": str(zip_path),
                         "env_vars": {"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1",
                                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}},
            metadata={"raycraft.command": shlex.join(command)}))
    echo(f"submitted job {job_id} to {url}: {entrypoint}")
    if not wait:
        echo(f"follow it with `raycraft jobs logs {job_id} --address {url}`")
        return job_id, 0
    return job_id, follow(jobs, job_id, echo)


def follow(jobs, job_id: str, echo=print) -> int:
    """Stream the job's logs until it ends; its exit code (1 if it failed without one)."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        echo(f"\nstopped following; the job keeps running. `raycraft jobs stop {job_id}` ends it.")
        return 130
    except RuntimeError:  # the log stream closed early; fall back to polling the status
        pass
    info = jobs.get_job_info(job_id)
    while info.status.value not in TERMINAL:
        time.sleep(1)
        info = jobs.get_job_info(job_id)
    echo(f"job {job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    if info.status.value == "SUCCEEDED":
        return 0
    return info.driver_exit_code or 1


def list_jobs(address: str | None) -> list:
    jobs = client(address)
    return sorted(_calling(jobs.list_jobs), key=lambda j: j.start_time or 0)


def job_logs(address: str | None, job_id: str, follow_logs: bool) -> tuple[str, int]:
    jobs = client(address)
    if follow_logs:
        _calling(jobs.get_job_info, job_id)
        return "", follow(jobs, job_id)
    return _calling(jobs.get_job_logs, job_id), 0


def stop_job(address: str | None, job_id: str) -> bool:
    return _calling(client(address).stop_job, job_id)


# ---------------------------------------------------------------------------------------------- Ray itself
# Ray Train's controller takes one queued report per poll, 2 s apart by default: a run of N short
# epochs would wait about 2N s for its reports to drain. raycraft polls faster; a user's value wins.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray(address: str | None = None, min_cpus: int = 0) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a private local Ray; never a stray cluster. A local
    Ray declares at least `min_cpus` CPUs: a streamed run's trainers may hold every core of a laptop, and Ray
    Data's reading tasks need one more to be scheduled at all (they then share the cores with the trainers)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}
    quiet = ray.LoggingConfig(log_level="WARNING")
    # the workers hide what this process hides (`raycraft --verbose`: neither does)
    hook = {"worker_process_setup_hook": noise.WORKER_HOOK} if noise.is_quiet() else {}
    if address:
        _join(address, {"env_vars": env, **hook}, quiet)
    else:
        _start_local({"env_vars": env, **hook}, quiet, max(os.cpu_count() or 1, min_cpus))
        keep_token_private()


def _join(address: str, runtime_env: dict[str, Any], quiet) -> None:
    if address != "auto":  # an unreachable address would make ray.init retry for minutes
        check_reachable(address, 10001 if address.startswith("ray://") else 6379)
    try:
        ray.init(address=address, logging_config=quiet, runtime_env=runtime_env)
    except AuthenticationError as exc:
        raise UserError(f"--address: Ray at {address!r} refused the token: {exc.message}. {AUTH_HELP}") from None
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        raise UserError(f"--address: cannot connect to Ray at {address!r}: {exc}") from None


def _start_local(runtime_env: dict[str, Any], quiet, num_cpus: int) -> None:
    """A Ray of this machine only. Ray Train's placement-group cleaner (which frees a run's CPUs when its
    controller dies, e.g. a sweep trial stopped early) finds its cluster by auto-detection, which fails when
    other Ray instances run on the machine: choose the GCS port, and tell every worker the address."""
    # Local mode has no preemptible nodes: skip Ray Train's watcher actor (one process fewer).
    env = runtime_env["env_vars"]
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    try:
        for attempt in range(3):
            port = free_port()  # a fresh port each attempt: a timed-out GCS may still hold the last one
            env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
            os.environ["RAY_GCS_SERVER_PORT"] = str(port)
            try:
                # Every Ray server binds to the node IP: 127.0.0.1. So does the dashboard, which hosts
                # the state API that Ray Train's cleanup polls.
                with single_node_ray():
                    ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                             num_cpus=num_cpus, logging_config=quiet, runtime_env=runtime_env)
                return
            except Exception as exc:  # Ray waits a fixed 30 s for its raylet; an overloaded machine misses it
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                ray.shutdown()
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


def keep_token_private() -> None:
    """A local ray.init writes the cluster's token (if missing) with the default umask: make it 0600."""
    token = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(FileNotFoundError):
        if token.stat().st_uid == os.getuid() and token.stat().st_mode & 0o077:
            token.chmod(0o600)


@contextlib.contextmanager
def single_node_ray():
    """Ray keeps a node IP of 127.0.0.1 only when it takes the machine for single-node (`ENABLE_RAY_CLUSTER`
    false, its Windows/macOS default); otherwise it swaps in the routable address. Its env var is read once,
    at Ray's import, so the module constant is set for the duration of one `ray.init`."""
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
