"""Driver of `raycraft rl` and `raycraft rl-eval`: validate, build the RLlib algorithm, train with
progress, checkpoint, log to MLflow; reload a logged policy and play it.

MLflow holds, per run: the config (params and config.yaml), per-iteration metrics at step = env steps
(return_mean, eval_return_mean, steps_per_s, ...), `returns.png`, the final policy twice: its weights as
`policy/weights.pt` (the inference network's tensors only, no pickled objects) and as the run's MLflow
model `model` (`GreedyPolicy`, observations to actions in the env's units, a torch.export graph with a
signature, which `mlflow.pyfunc.load_model` and `mlflow models serve` load), and the last full algorithm
checkpoint, as the artifact `checkpoint/` and on this machine's disk (the tag `raycraft.checkpoint`), for
`--resume`. Everything the user can get wrong is checked in `prepare` before Ray starts.

Nothing a tracking server hands out is unpickled: `rl-eval` rebuilds the module from config.yaml and
loads `policy/weights.pt` with torch's tensor-only loader; `--resume` loads RLlib's checkpoint (pickle
files), from the tagged folder or downloaded from the artifact, only when its manifest carries this
account's signature (`raycraft.checksums`), so a checkpoint someone else wrote is refused before anything
in it is read (of the artifact, before anything but its manifest is downloaded).

This module needs RLlib (the `rl` extra) and imports it at once: `raycraft rl`, `raycraft rl-eval` and RL
sweeps import it only after checking that the extra is installed.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    EPISODE_LEN_MEAN,
    EPISODE_RETURN_MEAN,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
)

from raycraft import checksums, lifecycle, tracking
from raycraft.cluster import init_ray
from raycraft.config import flatten, read_yaml, to_dict
from raycraft.errors import Stopped, UserError
from raycraft.registry import create_model, model_spec, models
from raycraft.rl import modules
from raycraft.rl.config import RLConfig, build_rl_config
from raycraft.rl.ddpg import DDPGConfig, DDPGTorchLearner, register
from raycraft.rl.dqn import DQNConfig, DQNTorchLearner
from raycraft.rl.environments import check_env, make, rllib_env
from raycraft.rl.evaluation import Evaluation, play
from raycraft.rl.plots import returns_png

CHECKPOINT_TAG = "raycraft.checkpoint"
CHECKPOINT_ARTIFACT = "checkpoint"  # the run's artifact folder that holds its last algorithm checkpoint
POLICY_FILE = "policy/weights.pt"
# What each training iteration logs (eval_return_mean on evaluation iterations, return_mean once an
# episode has ended).
ITERATION_METRICS = ("iteration", "env_steps", "return_mean", "episode_len_mean", "eval_return_mean",
                     "steps_per_s", "wall_s", "replay_size")


@dataclass
class Prepared:
    """What `prepare` found out about a job before Ray starts."""

    module_class: type
    observation_space: Any
    action_space: Any


@dataclass
class RLOutcome:
    run_id: str
    env_steps: int
    iterations: int
    eval_return: float | None
    wall_s: float
    checkpoint: str
    checkpoint_logged: int | None  # bytes of the checkpoint logged as CHECKPOINT_ARTIFACT (None: not logged)
    history: list[dict[str, float]] = field(default_factory=list)


def learner_class(algo: str) -> type:
    return DQNTorchLearner if algo == "dqn" else DDPGTorchLearner


def prepare(cfg: RLConfig, model_cfg: Any) -> Prepared:
    """Env id, action space against the algorithm, model class against the learner's required APIs."""
    check_env(cfg.env)
    env = make(cfg.env, cfg.env_config)
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if cfg.algo == "dqn" and not isinstance(act_space, gym.spaces.Discrete):
        raise UserError(f"--env: DQN picks one of finitely many actions, but {cfg.env!r} has a continuous action "
                        f"space {act_space}. Use `raycraft rl ddpg --env {cfg.env}`.")
    if cfg.algo == "ddpg" and not isinstance(act_space, gym.spaces.Box):
        raise UserError(f"--env: DDPG needs a continuous (Box) action space, but {cfg.env!r} has {act_space}. "
                        f"Use `raycraft rl dqn --env {cfg.env}`.")
    required = learner_class(cfg.algo).rl_module_required_apis()
    fits = ", ".join(sorted(n for n, s in models().items() if s.recipe.get("algo") == cfg.algo))
    made_for = model_spec(cfg.model).recipe.get("algo", cfg.algo)
    if made_for != cfg.algo:
        raise UserError(f"--model: {cfg.model!r} is a {made_for.upper()} model; it lacks "
                        f"{', '.join(api.__name__ for api in required)}, which {cfg.algo.upper()}'s learner "
                        f"needs. Models for {cfg.algo}: {fits}.")
    network = create_model(cfg.model, model_cfg, {"observation_space": obs_space, "action_space": act_space})
    cls = modules.module_class(network)
    missing = [api.__name__ for api in required if not issubclass(cls, api)]
    if missing:
        raise UserError(f"--model: {cfg.model!r} ({cls.__name__}) lacks {', '.join(missing)}, which "
                        f"{cfg.algo.upper()}'s learner needs. Models for {cfg.algo}: {fits}.")
    return Prepared(cls, obs_space, act_space)


def algorithm_config(cfg: RLConfig, model_cfg: Any, module_class: type):
    """The RLlib AlgorithmConfig (new API stack) for this job."""
    replay = ({"type": "PrioritizedEpisodeReplayBuffer", "capacity": cfg.replay.capacity,
               "alpha": cfg.replay.alpha, "beta": cfg.replay.beta} if cfg.replay.prioritized
              else {"type": "EpisodeReplayBuffer", "capacity": cfg.replay.capacity})
    common = {"gamma": cfg.gamma, "train_batch_size_per_learner": cfg.batch_size, "n_step": cfg.n_step,
              "num_steps_sampled_before_learning_starts": cfg.learning_starts,
              "training_intensity": cfg.training_intensity, "grad_clip": cfg.grad_clip,
              "replay_buffer_config": replay}
    if cfg.algo == "dqn":
        d = cfg.dqn
        config = DQNConfig().training(
            **common, lr=cfg.lr, double_q=model_cfg.double_q, dueling=model_cfg.dueling,
            epsilon=[(0, d.epsilon_initial), (d.epsilon_timesteps, d.epsilon_final)],
            target_network_update_freq=d.target_update_freq, tau=1.0, td_error_loss_fn=d.td_loss)
    else:
        d = cfg.ddpg
        config = DDPGConfig().training(**common, actor_lr=d.actor_lr, critic_lr=d.critic_lr, tau=d.tau,
                                       noise=d.noise, noise_sigma=d.noise_sigma, ou_theta=d.ou_theta)
    return (config
            .environment(env=rllib_env(cfg.env), env_config=dict(cfg.env_config))
            .framework("torch")
            .env_runners(num_env_runners=cfg.workers, num_envs_per_env_runner=cfg.envs_per_worker,
                         rollout_fragment_length=max(cfg.train_every, cfg.n_step))
            .learners(num_learners=0)
            .rl_module(rl_module_spec=RLModuleSpec(module_class=module_class,
                                                   model_config=modules.module_config(cfg.model, model_cfg)))
            .reporting(min_sample_timesteps_per_iteration=cfg.steps_per_iter, min_time_s_per_iteration=0)
            # No system-usage thread: nothing reads its numbers, and `stop()` waited up to 0.7 s for its sleep.
            .debugging(seed=cfg.seed, log_level="ERROR", log_sys_usage=False))


def iteration_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers raycraft shows and logs from one `Algorithm.train()` result."""
    runners = result.get(ENV_RUNNER_RESULTS, {})
    out = {"iteration": float(result["training_iteration"]),
           "env_steps": float(runners.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0))}
    for key, value in (("return_mean", runners.get(EPISODE_RETURN_MEAN)),
                       ("episode_len_mean", runners.get(EPISODE_LEN_MEAN))):
        if value is not None and value == value:  # NaN before the first finished episode
            out[key] = float(value)
    return out


def _leftovers(path: Path) -> tuple[Path, Path]:
    """(`.tmp`, `.old`): the folders `save_checkpoint` writes beside `path` while it replaces it."""
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")


def clear_leftovers(path: Path) -> None:
    for folder in _leftovers(path):
        shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(algo, path: Path, with_buffer: bool = False) -> None:
    """Write the whole algorithm (modules, optimizers, step counters) to `path`, replacing it atomically;
    with `with_buffer`, also the replay buffer's contents (`TransitionReplay.save`: no pickle). A signed
    manifest, written last, is what lets `trusted_checkpoint` accept it."""
    tmp, old = _leftovers(path)
    clear_leftovers(path)
    algo.save_to_path(str(tmp))
    if with_buffer:
        algo.local_replay_buffer.save(tmp)
    checksums.write_manifest(tmp, sign=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _recover_old(path: Path) -> None:
    """A save killed between its two renames left only `.old`: put it back if this account signed it."""
    old = _leftovers(path)[1]
    if not path.exists() and checksums.problem(old, signed=True) is None:
        old.rename(path)


def local_checkpoint_dir(cfg: RLConfig, run_id: str) -> Path:
    """Where this machine keeps run `run_id`'s checkpoint: a folder of `storage_path`."""
    return (Path(cfg.storage_path) / f"raycraft-rl-{run_id}" / "checkpoint").resolve()


def refused(where: str, why: str) -> UserError:
    return UserError(f"--resume: the checkpoint {where} is refused: {why}. raycraft loads RLlib checkpoints (pickle "
                     f"files) only when raycraft on this account wrote them, signed with {checksums.key_path()}; "
                     "to resume on one machine a run trained on another, both need that same key file.")


def trusted_checkpoint(uri: str, run, local: Path) -> Path:
    """The run's last checkpoint: the folder its tag names, or, where that is not on this machine, its
    CHECKPOINT_ARTIFACT downloaded to `local`; either only once its signed manifest shows that raycraft on this
    account wrote it and nothing in it changed since. What a killed save left beside it is cleared."""
    tag = run.data.tags.get(CHECKPOINT_TAG)
    if tag:
        _recover_old(Path(tag))
    if tag and Path(tag).is_dir():
        path, where = Path(tag), f"at {tag}"
    else:
        path, where = download_checkpoint(uri, run.info.run_id, local), f"of run {run.info.run_id} in MLflow"
    why = checksums.problem(path, signed=True)
    if why:
        raise refused(where, why)
    clear_leftovers(path)
    return path


def download_checkpoint(uri: str, run_id: str, path: Path) -> Path:
    """The run's CHECKPOINT_ARTIFACT, into `path` (replacing it): its manifest first and, once that is signed with
    this account's key, each file it lists (not what older checkpoints of the run left in the artifact)."""
    staging = _leftovers(path)[0]
    clear_leftovers(path)
    try:
        tracking.download_artifact(uri, run_id, f"{CHECKPOINT_ARTIFACT}/{checksums.MANIFEST}", staging)
    except UserError:
        raise UserError(f"--resume: run {run_id!r} has no checkpoint on this machine, and none in MLflow (a run "
                        f"logs {CHECKPOINT_ARTIFACT}/ when it finishes, unless log_checkpoint=false).") from None
    try:
        names = checksums.listing(staging, signed=True)
    except ValueError as why:
        shutil.rmtree(staging)
        raise refused(f"of run {run_id} in MLflow", str(why)) from None
    for name in names:  # MLflow puts a downloaded file at the top of its destination
        tracking.download_artifact(uri, run_id, f"{CHECKPOINT_ARTIFACT}/{name}", (staging / name).parent)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def restore_checkpoint(algo, path: Path) -> None:
    """The algorithm's state, and the replay buffer where the checkpoint holds one, from a folder
    `trusted_checkpoint` accepted."""
    algo.restore_from_path(str(path))
    algo.local_replay_buffer.load(path)


def train_rl(cfg: RLConfig, model_cfg: Any, *, tracking_uri: str | None = None, address: str | None = None,
             resume_run_id: str | None = None, on_start: Callable[[str], None] | None = None,
             on_iteration: Callable[[dict[str, float]], None] | None = None, run_name: str | None = None,
             tags: dict[str, str] | None = None) -> RLOutcome:
    """Train until `cfg.reached`, logging each iteration to MLflow; `run_name` and `tags` name a new run."""
    torch.set_num_threads(1)  # small networks: more threads only contend with the env runners
    prepared = prepare(cfg, model_cfg)
    run, checkpoint_dir = open_run(cfg, tracking.resolve_tracking_uri(tracking_uri), resume_run_id,
                                   run_name, tags)
    if on_start:
        on_start(run.run_id)
    start = time.perf_counter()
    try:
        init_ray(address)  # before the handlers: Ray's core worker sets its own for SIGTERM
        register()
        with run.heartbeat(), lifecycle.stop_on_signals(), frozen_heap():
            history = iterate(cfg, model_cfg, prepared, run, checkpoint_dir, bool(resume_run_id), on_iteration)
    except BaseException as exc:
        if run.end_with(exc) == "KILLED":
            raise Stopped(getattr(exc, "signum", signal.SIGINT), run.run_id) from None
        raise
    run.end()
    m = history[-1]
    logged = sum(f.stat().st_size for f in checkpoint_dir.rglob("*") if f.is_file()) if cfg.log_checkpoint else None
    return RLOutcome(run.run_id, int(m["env_steps"]), int(m["iteration"]), m.get("eval_return_mean"),
                     time.perf_counter() - start, str(checkpoint_dir), logged, history)


def open_run(cfg: RLConfig, uri: str, resume_run_id: str | None, run_name: str | None,
             tags: dict[str, str] | None) -> tuple[tracking.Run, Path]:
    """(the run, its checkpoint folder): the resumed run, reopened once its checkpoint is trusted, or a new
    run; either tagged with where its checkpoints go on this machine."""
    if resume_run_id:
        checkpoint_dir = trusted_checkpoint(uri, tracking.get_run(uri, resume_run_id),
                                            local_checkpoint_dir(cfg, resume_run_id))
        run = tracking.Run.resume(uri, resume_run_id)
        run.set_tags({CHECKPOINT_TAG: str(checkpoint_dir)})
        return run, checkpoint_dir
    name = run_name or f"{cfg.algo}-{cfg.env.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = tracking.Run.start(uri, cfg.experiment, name, flatten(to_dict(cfg)),
                             {"raycraft.model": cfg.model, "raycraft.env": cfg.env, "raycraft.algo": cfg.algo,
                              tracking.TASK_TAG: "rl", **(tags or {})},
                             yaml.safe_dump(to_dict(cfg), sort_keys=False))
    checkpoint_dir = local_checkpoint_dir(cfg, run.run_id)
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    run.set_tags({CHECKPOINT_TAG: str(checkpoint_dir)})
    return run, checkpoint_dir


def iterate(cfg: RLConfig, model_cfg: Any, prepared: Prepared, run: tracking.Run, checkpoint_dir: Path,
            resume: bool, on_iteration: Callable[[dict[str, float]], None] | None) -> list[dict[str, float]]:
    """Build the algorithm (restored from `checkpoint_dir` with `resume`), train it until `cfg.reached`,
    logging each iteration (at step = env steps) and checkpointing, then log (with `cfg.log_checkpoint`) the
    last checkpoint and the policy; returns the iterations' metrics."""
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    with contextlib.closing(Evaluation(cfg.env, cfg.env_config, cfg.eval_episodes, cfg.seed)) as evaluation:
        algo = algorithm_config(cfg, model_cfg, prepared.module_class).build_algo()
        try:
            if resume:
                restore_checkpoint(algo, checkpoint_dir)
            steps, last_t = 0.0, time.perf_counter()
            while not history or not cfg.reached(history[-1]):
                m = train_iteration(algo, cfg, evaluation)
                lifecycle.raise_if_stopped()
                now = time.perf_counter()
                m["steps_per_s"] = (m["env_steps"] - steps) / max(now - last_t, 1e-9)
                m["wall_s"] = now - start
                m["replay_size"] = float(len(algo.local_replay_buffer))
                steps, last_t = m["env_steps"], now
                history.append(m)
                run.log_metrics(m, step=int(m["env_steps"]))
                if on_iteration:
                    on_iteration(m)
                if cfg.reached(m) or int(m["iteration"]) % cfg.checkpoint_every == 0:
                    save_checkpoint(algo, checkpoint_dir, cfg.replay.save_in_checkpoint)
            log_checkpoint(cfg, run, checkpoint_dir)
            log_policy(run, algo.get_module(), history, inference_module(cfg, model_cfg, prepared),
                       example_observations(cfg))
        except BaseException:
            with contextlib.suppress(Exception):  # a stopped or failed run keeps its last checkpoint for --resume
                log_checkpoint(cfg, run, checkpoint_dir)
            raise
        finally:
            algo.stop()
    return history


def train_iteration(algo, cfg: RLConfig, evaluation: Evaluation) -> dict[str, float]:
    """One RLlib training iteration's metrics, with the greedy evaluation's mean return every
    `eval_interval` iterations."""
    m = iteration_metrics(algo.train())
    if int(m["iteration"]) % cfg.eval_interval == 0:
        m["eval_return_mean"] = float(np.mean(evaluation(algo.get_module())))
    return m


@contextlib.contextmanager
def frozen_heap():
    """Python's cyclic garbage collector leaves alone every object that exists on entry until exit: Ray's,
    torch's, RLlib's and MLflow's, about 800k. A full collection walks them all (0.4 s); one came in each
    CartPole run traced (8k env steps, while plotting the returns). Objects still free themselves by reference
    counting; only reference cycles among them wait for the exit, when the next full collection walks them."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def log_checkpoint(cfg: RLConfig, run: tracking.Run, checkpoint_dir: Path) -> None:
    """The last saved checkpoint as the run's `checkpoint/` artifact (`log_checkpoint`), when there is one."""
    if cfg.log_checkpoint and checkpoint_dir.is_dir():
        run.log_artifacts(checkpoint_dir, CHECKPOINT_ARTIFACT)


def log_policy(run: tracking.Run, module, history: list[dict[str, float]], served, example: torch.Tensor) -> None:
    """The final policy of `module` as the run's artifacts: its tensors (POLICY_FILE, for `rl-eval`), and the
    run's MLflow model: a `GreedyPolicy` around `served` (an inference-only module) loaded from those same
    tensors, its signature from the observations `example`, its metrics the final iteration's; and the
    returns plot."""
    with tempfile.TemporaryDirectory() as tmp:
        save_policy(module, Path(tmp) / POLICY_FILE)
        load_policy(served, Path(tmp) / POLICY_FILE, run.run_id)
        returns_png(history, Path(tmp) / "returns.png")
        run.log_artifact(Path(tmp) / POLICY_FILE, str(Path(POLICY_FILE).parent))
        run.log_artifact(Path(tmp) / "returns.png")
    policy = modules.GreedyPolicy(served)
    run.log_model(policy, example, final=history[-1], about=" ".join(policy.__doc__.split()))


def example_observations(cfg: RLConfig) -> torch.Tensor:
    """First observations of two episodes, as float32: the logged model's input example (two, so that its
    batch dimension stays free)."""
    env = make(cfg.env, cfg.env_config)
    observations = [env.reset(seed=cfg.seed + i)[0] for i in range(2)]
    env.close()
    return torch.as_tensor(np.stack(observations), dtype=torch.float32)


def save_policy(module, path: Path) -> None:
    """The inference network's tensors (no target networks, no DDPG critic), for `load_policy`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.as_tensor(v) for k, v in module.get_state(inference_only=True).items()}, path)


def load_policy(module, path: Path, run_id: str) -> None:
    """`path`'s tensors into `module`, through torch's tensor-only unpickler: exactly the module's keys
    and shapes, or a UserError."""
    what = f"RUN_ID: run {run_id!r}: {POLICY_FILE}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{what} is not a file of tensors, so it is not loaded "
                        f"({str(exc).strip().splitlines()[0]}).") from None
    if not isinstance(state, dict):
        raise UserError(f"{what} holds a {type(state).__name__}, not a dict of tensors.")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{what} does not fit the {type(module).__name__} that its config.yaml builds: "
                        f"{' '.join(str(exc).split())}") from None


def inference_module(cfg: RLConfig, model_cfg: Any, prepared: Prepared):
    """A new inference-only RLModule of the job's network (no target networks, no DDPG critic)."""
    return RLModuleSpec(module_class=prepared.module_class, observation_space=prepared.observation_space,
                        action_space=prepared.action_space, inference_only=True,
                        model_config=modules.module_config(cfg.model, model_cfg)).build()


def logged_policy(uri: str, run_id: str) -> tuple[Any, RLConfig]:
    """RUN_ID's policy, rebuilt from its config.yaml as an inference-only RLModule with its logged weights."""
    text = tracking.download_text(uri, run_id, "config.yaml")
    cfg, model_cfg = build_rl_config(read_yaml(text, f"run {run_id}'s config.yaml"), [])
    module = inference_module(cfg, model_cfg, prepare(cfg, model_cfg))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = tracking.download_artifact(uri, run_id, POLICY_FILE, tmp)
        except UserError:
            raise UserError(f"RUN_ID: run {run_id!r} has no {POLICY_FILE} (raycraft's tensor-only policy file): "
                            "it did not finish, or it was not logged by this version of raycraft. rl-eval "
                            "never loads RLlib checkpoints (pickle files) from a tracking server.") from None
        load_policy(module, local, run_id)
    return module, cfg


def evaluate_rl(run_id: str, *, episodes: int = 10, video: Path | None = None,
                tracking_uri: str | None = None) -> list[float]:
    """Reload RUN_ID's logged policy (`logged_policy`), play it, log the result."""
    torch.set_num_threads(1)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if tracking.get_run(uri, run_id).data.tags.get(tracking.TASK_TAG) != "rl":
        raise UserError(f"RUN_ID: run {run_id!r} is not a `raycraft rl` run; use `raycraft eval` for it.")
    if episodes < 1:
        raise UserError(f"--episodes: must be at least 1, got {episodes}.")
    module, cfg = logged_policy(uri, run_id)
    returns = play(module, cfg.env, cfg.env_config, episodes, seed=10_000, gif=video)
    run = tracking.Run(uri, run_id)
    run.log_metrics({"rl_eval_return_mean": sum(returns) / len(returns)})
    if video:
        run.log_artifact(video)
    return returns
