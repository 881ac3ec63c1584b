"""`raycraft rl ALGO --env ENV ...` and `raycraft rl-eval RUN_ID ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from raycraft.config import build
from raycraft.console import (
    AddressOpt,
    IterationProgress,
    SetOpt,
    TrackingOpt,
    console,
    field_option,
    format_number,
)
from raycraft.errors import invalid_choice
from raycraft.rl.config import ALGOS, RLConfig
from raycraft.tracking import resolve_tracking_uri, ui_command
from raycraft.train.config import config_layers

app = typer.Typer()
# An iteration's figures on its progress line, and their names there.
LABELS = {"iteration": "iter", "env_steps": "steps", "return_mean": "return", "eval_return_mean": "eval",
          "steps_per_s": "steps/s"}


def _fmt(m: dict[str, float]) -> str:
    return "  ".join(f"{label} {format_number(m[k])}" for k, label in LABELS.items() if k in m)


@app.command("rl")
def rl(
    algo: Annotated[str, typer.Argument(help="dqn or ddpg.")],
    env: field_option(RLConfig, "env", "--env") = None,
    model: field_option(RLConfig, "model", "--model") = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of RLConfig keys.")] = None,
    set_: SetOpt = None,
    stop_reward: field_option(RLConfig, "stop_reward", "--stop-reward") = None,
    timesteps: field_option(RLConfig, "timesteps", "--timesteps") = None,
    workers: field_option(RLConfig, "workers", "--workers") = None,
    seed: field_option(RLConfig, "seed") = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="MLflow run id to continue.")] = None,
    experiment: field_option(RLConfig, "experiment") = None,
    address: AddressOpt = None,
    tracking_uri: TrackingOpt = None,
):
    """Train ALGO on --env with RLlib; prints progress and the MLflow run id."""
    if algo not in ALGOS:
        raise invalid_choice("ALGO", algo, ALGOS)
    uri = resolve_tracking_uri(tracking_uri)
    flags = {"algo": algo, "env": env, "model": model, "stop_reward": stop_reward, "timesteps": timesteps,
             "workers": workers, "seed": seed, "experiment": experiment}
    cfg, model_cfg = build(RLConfig, config_layers(uri, config, resume, flags), set_ or [])
    from raycraft.rl.run import CHECKPOINT_ARTIFACT, train_rl  # RLlib (3 s, the `rl` extra): once the flags are good

    def on_start(run_id: str) -> None:
        verb = "resuming" if resume else "training"
        console.print(f"[cyan]{verb}[/] {cfg.algo} ({cfg.model}) on {cfg.env}; MLflow run {run_id}")

    with IterationProgress(cfg.timesteps, cfg.steps_per_iter) as shown:
        outcome = train_rl(cfg, model_cfg, tracking_uri=uri, address=address, resume_run_id=resume,
                           on_start=on_start, on_iteration=lambda m: shown.iteration(m, _fmt(m)))
    eval_return = "-" if outcome.eval_return is None else format_number(outcome.eval_return)
    console.print(f"[green]done[/]  run id: [bold]{outcome.run_id}[/]  env steps {outcome.env_steps}  "
                  f"eval return {eval_return}  wall {outcome.wall_s:.0f} s")
    if outcome.checkpoint_logged is not None:
        console.print(f"checkpoint: {outcome.checkpoint_logged / 2**20:.1f} MiB logged to MLflow as artifact "
                      f"{CHECKPOINT_ARTIFACT}/, for --resume on another machine")
    console.print(f"MLflow UI: {ui_command(uri, outcome.run_id)}")


@app.command("rl-eval")
def rl_eval(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a `raycraft rl` run.")],
    episodes: Annotated[int, typer.Option("--episodes", help="Greedy episodes to play.")] = 10,
    video: Annotated[Optional[Path], typer.Option("--video", help="Write a GIF of the first episode here.")] = None,
    tracking_uri: TrackingOpt = None,
):
    """Reload RUN_ID's policy, play greedy episodes, report the mean return (and write a GIF)."""
    from raycraft.rl.run import evaluate_rl  # RLlib (3 s): not at the top, where `rl`'s bad input would wait

    returns = evaluate_rl(run_id, episodes=episodes, video=video, tracking_uri=tracking_uri)
    mean = format_number(sum(returns) / len(returns))
    console.print(f"run {run_id}: mean return {mean} over {len(returns)} episodes "
                  f"(min {format_number(min(returns))}, max {format_number(max(returns))})")
    if video:
        console.print(f"GIF: {video}")
