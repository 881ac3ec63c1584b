"""`raycraft submit` (run a raycraft command on a Ray cluster) and `raycraft jobs list|logs|stop`, through the
Ray Jobs API client in `raycraft.cluster`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from raycraft.cluster import job_logs, list_jobs, stop_job, submit
from raycraft.console import console

app = typer.Typer()
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster: list, logs, stop.")
app.add_typer(jobs_app, name="jobs")

AddressOpt = typer.Option("--address", help="The Ray dashboard's Jobs API, http://HOST:8265 (default: "
                          "$RAY_API_SERVER_ADDRESS, else an http $RAY_ADDRESS, else http://127.0.0.1:8265).")
JobIdArg = typer.Argument(help="Job id (as `raycraft submit` printed it, or from `raycraft jobs list`).")


@app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit_cmd(
    ctx: typer.Context,
    address: Optional[str] = AddressOpt,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Stream the job's logs until it ends."),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="Project folder shipped with the job."),
):
    """Run a raycraft command on a Ray cluster: `raycraft submit [--address URL] -- train lenet5 ...`.

    --address is the Ray dashboard (http://HOST:8265; default $RAY_API_SERVER_ADDRESS, else localhost).
    Exits with the job's exit code."""
    root = ctx.find_root()
    commands = root.command.list_commands(root)  # asked of the root: this module does not import raycraft.cli
    _, code = submit(list(ctx.args), commands, address=address, working_dir=working_dir, wait=wait,
                     echo=console.print)
    raise typer.Exit(code)


@jobs_app.command("list")
def jobs_list(address: Optional[str] = AddressOpt):
    """Every job on the cluster, oldest first: id, status, start time, command (one line each)."""
    for job in list_jobs(address):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        print(f"{job.submission_id or job.job_id}  {job.status.value:<9}  {started}  {job.entrypoint}")


@jobs_app.command("logs")
def jobs_logs(job_id: str = JobIdArg, address: Optional[str] = AddressOpt,
              follow_logs: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends.")):
    """The job's driver output."""
    text, code = job_logs(address, job_id, follow_logs)
    sys.stdout.write(text)
    raise typer.Exit(code)


@jobs_app.command("stop")
def jobs_stop(job_id: str = JobIdArg, address: Optional[str] = AddressOpt):
    """Stop a running job."""
    stopped = stop_job(address, job_id)
    console.print(f"job {job_id}: " + ("stop requested" if stopped else "was not running"))
