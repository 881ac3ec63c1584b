"""DQN's TD target, DDPG's losses, soft target updates and exploration, tied to hand-computed values.

Real RLlib learners (built in-process, no Ray job) run their own loss code on a fixed batch; the tests
recompute each quantity from the survey's formula with the module's networks.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME, TD_ERROR_KEY
from ray.rllib.utils.torch_utils import clip_gradients

from raycraft.models.rl import DDPGMLPConfig, QMLPConfig
from raycraft.rl.ddpg import DDPGConfig
from raycraft.rl.dqn import DQNConfig, FiniteStepAdam, clip_by_global_norm, round_robin
from raycraft.rl.modules import Q_MU, Q_TARGET_NEXT, QF_PREDS, DDPGModule, QModule, module_config

MID = "default_policy"
OBS = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
B = 6


def batch(action_space: gym.Space, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if isinstance(action_space, gym.spaces.Discrete):
        actions = torch.randint(0, action_space.n, (B,), generator=g)
    else:
        actions = torch.rand(B, *action_space.shape, generator=g) * 2 - 1
    return {Columns.OBS: torch.randn(B, 3, generator=g), Columns.NEXT_OBS: torch.randn(B, 3, generator=g),
            Columns.ACTIONS: actions, Columns.REWARDS: torch.randn(B, generator=g),
            Columns.TERMINATEDS: torch.tensor([0, 1, 0, 0, 1, 0]).bool(),
            "n_step": torch.tensor([1, 1, 2, 3, 1, 2]), "weights": torch.rand(B, generator=g) + 0.5}


def perturb_targets(module) -> None:
    """Make θ⁻ differ from θ, so a target computed with the wrong network cannot pass."""
    with torch.no_grad():
        for _, target in module.get_target_network_pairs():
            for p in target.parameters():
                p.add_(0.3 * torch.randn_like(p))


def dqn_learner(double_q: bool, dueling: bool, gamma: float = 0.9, loss: str = "mse"):
    model = QMLPConfig(hiddens=(8,), head_hiddens=(8,), double_q=double_q, dueling=dueling)
    config = (DQNConfig().training(gamma=gamma, double_q=double_q, dueling=dueling, td_error_loss_fn=loss,
                                   tau=1.0, train_batch_size_per_learner=B)
              .rl_module(rl_module_spec=RLModuleSpec(module_class=QModule,
                                                     model_config=module_config("q_mlp", model))))
    return config, config.build_learner(spaces={MID: (OBS, gym.spaces.Discrete(4))})


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("double_q", [True, False])
def test_dqn_td_target_and_loss(double_q, loss):
    config, learner = dqn_learner(double_q, dueling=True, loss=loss)
    module = learner.module[MID]
    perturb_targets(module)
    b = batch(module.action_space)
    learner.add_target_values({MID: b})
    fwd = module.forward_train(b)
    value = learner.compute_loss_for_module(module_id=MID, config=config, batch=b, fwd_out=fwd)

    with torch.no_grad():
        q_online_next = module.compute_q_values({Columns.OBS: b[Columns.NEXT_OBS]})[QF_PREDS]
        q_target_next = module.forward_target({Columns.OBS: b[Columns.NEXT_OBS]})[QF_PREDS]
        q = module.compute_q_values({Columns.OBS: b[Columns.OBS]})[QF_PREDS]
    rows = torch.arange(B)
    if double_q:  # θ picks, θ⁻ scores
        next_value = q_target_next[rows, q_online_next.argmax(-1)]
    else:  # max_a' Q(s', a'; θ⁻)
        next_value = q_target_next.max(-1).values
    y = b[Columns.REWARDS] + 0.9 ** b["n_step"] * (1 - b[Columns.TERMINATEDS].float()) * next_value
    delta = q[rows, b[Columns.ACTIONS]] - y
    per_row = delta ** 2 if loss == "mse" else torch.where(delta.abs() < 1, 0.5 * delta ** 2, delta.abs() - 0.5)
    torch.testing.assert_close(value.detach(), torch.mean(b["weights"] * per_row), rtol=1e-5, atol=1e-6)


def test_a_step_with_non_finite_gradients_is_skipped(caplog):
    config, learner = dqn_learner(double_q=True, dueling=True)
    module = learner.module[MID]
    b = batch(module.action_space)
    learner.add_target_values({MID: b})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    grads = learner.compute_gradients({MID: learner.compute_loss_for_module(
        module_id=MID, config=config, batch=b, fwd_out=module.forward_train(b))})
    first = next(iter(grads))
    learner.apply_gradients({**grads, first: torch.full_like(grads[first], float("nan"))})
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    learner.warn_skipped_steps()
    assert "Skipped 1 of this call's gradient steps" in caplog.text
    learner.apply_gradients(grads)
    assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
    (_, optimizer), = learner.get_optimizers_for_module(MID)
    assert optimizer.state[next(iter(optimizer.state))]["step"] == 1  # the skipped step does not count


def test_finite_step_adam_is_torch_adam_and_skips_non_finite_steps():
    """Step for step, bit for bit, torch's fused Adam, through a change of learning rate and a checkpoint
    round trip; a step with a NaN gradient changes nothing, not even Adam's step count."""
    torch.manual_seed(0)
    ours, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    reference.load_state_dict(ours.state_dict())
    opt_ours, opt_ref = FiniteStepAdam(list(ours.parameters())), torch.optim.Adam(reference.parameters(), fused=True)
    for i in range(6):
        x = torch.randn(5, 3)
        if i == 3:
            for opt in (opt_ours, opt_ref):
                opt.param_groups[0]["lr"] = 0.01
        if i == 4:
            opt_ours = FiniteStepAdam(list(ours.parameters()))
            opt_ours.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # as from a checkpoint file
        for net, opt in ((ours, opt_ours), (reference, opt_ref)):
            opt.zero_grad()
            net(x).square().sum().backward()
        before = [p.clone() for p in ours.parameters()]
        ours.weight.grad[0, 0] = float("nan")
        opt_ours.step()
        assert all(torch.equal(p, b) for p, b in zip(ours.parameters(), before, strict=True))
        ours.weight.grad.copy_(reference.weight.grad)
        opt_ours.step()
        opt_ref.step()
        for p, q in zip(ours.parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q)
            assert torch.equal(opt_ours.state[p]["step"], opt_ref.state[q]["step"])
            assert torch.equal(opt_ours.state[p]["exp_avg_sq"], opt_ref.state[q]["exp_avg_sq"])
    assert opt_ours.take_skipped() == 2 and opt_ours.take_skipped() == 0  # since the round trip: steps 4 and 5


@pytest.mark.parametrize("runners, envs, fragment, batch, intensity, expected", [
    (0, 8, 5, 32, 32, (1, 40)),   # CartPole's preset: 40 env steps, 40 batches of 32
    (1, 8, 5, 32, 32, (1, 40)),   # the same on one remote EnvRunner (RLlib's own weights: 80)
    (2, 1, 20, 256, 256, (1, 40)),  # two runners of 20 steps each
    (0, 1, 5, 64, 8, (2, 1)),     # fewer replayed than sampled: two sampling rounds per batch
])
def test_gradient_steps_per_phase_count_the_runners_that_sample(runners, envs, fragment, batch, intensity,
                                                                   expected):
    config = (DQNConfig().env_runners(num_env_runners=runners, num_envs_per_env_runner=envs,
                                      rollout_fragment_length=fragment)
              .training(train_batch_size_per_learner=batch, training_intensity=intensity))
    assert round_robin(config) == expected


@pytest.mark.parametrize("clip", [0.5, 100.0])
def test_clip_by_global_norm_is_rllibs_clip(clip):
    g = torch.Generator().manual_seed(0)
    grads = {i: torch.randn(5, 3, generator=g) for i in range(4)}
    mine, theirs = {k: v.clone() for k, v in grads.items()}, {k: v.clone() for k, v in grads.items()}
    norm = clip_by_global_norm(mine, grad_clip=clip, grad_clip_by="global_norm")
    torch.testing.assert_close(norm, clip_gradients(theirs, grad_clip=clip, grad_clip_by="global_norm"))
    for k in grads:
        torch.testing.assert_close(mine[k], theirs[k])
    assert torch.equal(mine[0], grads[0]) == (clip == 100.0)  # under the limit nothing changes


def test_dueling_head_is_value_plus_centred_advantage():
    module = QModule(observation_space=OBS, action_space=gym.spaces.Discrete(4),
                     model_config=module_config("q_mlp", QMLPConfig(hiddens=(8,), head_hiddens=(8,))))
    obs = torch.randn(5, 3)
    h = module.torso(obs)
    v, a = module.value(h), module.advantage(h)
    torch.testing.assert_close(module.compute_q_values({Columns.OBS: obs})[QF_PREDS], v + a - a.mean(-1, keepdim=True))


def ddpg_learner(tau: float = 0.005, gamma: float = 0.9):
    model = DDPGMLPConfig(actor_hiddens=(8,), critic_hiddens=(8,))
    config = (DDPGConfig().training(gamma=gamma, tau=tau, train_batch_size_per_learner=B)
              .rl_module(rl_module_spec=RLModuleSpec(module_class=DDPGModule,
                                                     model_config=module_config("ddpg_mlp", model))))
    return config, config.build_learner(spaces={MID: (OBS, gym.spaces.Box(-2.0, 2.0, (2,), np.float32))})


def test_ddpg_critic_and_actor_losses():
    config, learner = ddpg_learner()
    module = learner.module[MID]
    perturb_targets(module)
    b = batch(module.action_space)
    fwd = module.forward_train(b)
    learner.compute_loss_for_module(module_id=MID, config=config, batch=b, fwd_out=fwd)
    critic_loss = learner._temp_losses[(MID, "critic")]
    actor_loss = learner._temp_losses[(MID, "actor")]

    def q(net, s, a):
        return net(torch.cat([s, a], -1)).squeeze(-1)

    with torch.no_grad():
        s, s2, a = b[Columns.OBS], b[Columns.NEXT_OBS], b[Columns.ACTIONS]
        y = b[Columns.REWARDS] + 0.9 ** b["n_step"] * (1 - b[Columns.TERMINATEDS].float()) * q(
            module._target_critic, s2, module._target_actor(s2))
        expected_critic = torch.mean(b["weights"] * (q(module.critic, s, a) - y) ** 2)
        expected_actor = -q(module.critic, s, module.actor(s)).mean()
        assert torch.all(module.actor(s).abs() <= 1.0)
    torch.testing.assert_close(critic_loss.detach(), expected_critic, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actor_loss.detach(), expected_actor, rtol=1e-5, atol=1e-6)
    assert fwd[Q_MU].requires_grad


def test_ddpg_gradients_each_from_its_own_loss():
    """The critic's gradient is ∇θ of the critic loss alone; the actor's is the deterministic policy gradient."""
    config, learner = ddpg_learner()
    module = learner.module[MID]
    b = batch(module.action_space)
    fwd = module.forward_train(b)
    loss = learner.compute_loss_for_module(module_id=MID, config=config, batch=b, fwd_out=fwd)
    grads = learner.compute_gradients({MID: loss})

    s, a = b[Columns.OBS], b[Columns.ACTIONS]
    fresh = module.forward_train(b)
    y = (b[Columns.REWARDS] + 0.9 ** b["n_step"] * (1 - b[Columns.TERMINATEDS].float()) * fresh[Q_TARGET_NEXT])
    critic_loss = torch.mean(b["weights"] * (module.critic(torch.cat([s, a], -1)).squeeze(-1) - y) ** 2)
    want_critic = torch.autograd.grad(critic_loss, list(module.critic.parameters()))
    mu = module.actor(s)
    actor_loss = -module.critic(torch.cat([s, mu], -1)).mean()
    want_actor = torch.autograd.grad(actor_loss, list(module.actor.parameters()))
    got = {id(p): grads[learner.get_param_ref(p)] for p in module.parameters() if p.requires_grad}
    for p, g in zip(module.critic.parameters(), want_critic, strict=True):
        torch.testing.assert_close(got[id(p)], g, rtol=1e-5, atol=1e-6)
    for p, g in zip(module.actor.parameters(), want_actor, strict=True):
        torch.testing.assert_close(got[id(p)], g, rtol=1e-5, atol=1e-6)


def test_soft_target_update_is_polyak_average_after_each_gradient_step():
    tau = 0.3
    config, learner = ddpg_learner(tau=tau)
    module = learner.module[MID]
    perturb_targets(module)
    before = [(m.state_dict(), {k: v.clone() for k, v in t.state_dict().items()})
              for m, t in module.get_target_network_pairs()]
    learner.after_gradient_based_update(timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 10})  # not here: once per call
    learner.apply_gradients({})  # no gradients: the optimizers leave θ as it is, the targets move
    for (main, target_old), (_, target) in zip(before, module.get_target_network_pairs(), strict=True):
        for k, v in target.state_dict().items():
            torch.testing.assert_close(v, tau * main[k] + (1 - tau) * target_old[k])


@pytest.mark.parametrize("algo", ["dqn", "ddpg"])
def test_one_learner_call_of_k_batches_is_k_calls_of_one(algo):
    """`DQN.learn` hands the Learner K batches in one call: the same K gradient steps (and, for DDPG, K soft
    target updates) as K calls of one batch, in the same order."""
    make = (lambda: dqn_learner(double_q=True, dueling=True)) if algo == "dqn" else (lambda: ddpg_learner(tau=0.3))
    (_, one_call), (_, k_calls) = make(), make()
    perturb_targets(one_call.module[MID])
    k_calls.set_state(one_call.get_state())
    start = {k: v.clone() for k, v in one_call.module[MID].state_dict().items()}
    batches = [batch(one_call.module[MID].action_space, seed) for seed in range(3)]
    timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: 10}
    joined = SampleBatch({k: torch.cat([b[k] for b in batches]) for k in batches[0]})
    results = one_call.update(batch=MultiAgentBatch({MID: joined}, env_steps=3 * B), timesteps=timesteps)
    td_errors = [k_calls.update(batch=MultiAgentBatch({MID: SampleBatch(b)}, env_steps=B),
                                timesteps=timesteps)[MID][TD_ERROR_KEY].peek()[0] for b in batches]
    # Each step's |TD errors|, in order: the priorities of the rows they were computed on.
    torch.testing.assert_close(torch.tensor(results[MID][TD_ERROR_KEY].peek()), torch.tensor(td_errors))
    after = one_call.module[MID].state_dict()
    for k, v in k_calls.module[MID].state_dict().items():
        torch.testing.assert_close(after[k], v)
        moved = not torch.equal(after[k], start[k])
        assert moved == (algo == "ddpg" or "_target" not in k), k  # DQN's hard target sync is 500 steps away


def test_ddpg_noise_only_in_exploration():
    for noise in ("gaussian", "ou"):
        module = DDPGModule(observation_space=OBS, action_space=gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
                            model_config={**module_config("ddpg_mlp", DDPGMLPConfig(actor_hiddens=(8,),
                                                                                    critic_hiddens=(8,))),
                                          "noise": noise, "noise_sigma": 0.5})
        obs = {Columns.OBS: torch.randn(64, 3)}
        mu = module.actor(obs[Columns.OBS])
        inference = [module.forward_inference(obs)[Columns.ACTIONS] for _ in range(3)]
        for a in inference:
            torch.testing.assert_close(a, mu)
        explored = module.forward_exploration(obs, t=0)[Columns.ACTIONS]
        assert explored.abs().max() <= 1.0
        assert (explored - mu).abs().mean() > 0.1  # σ = 0.5 noise is there


def test_dqn_epsilon_greedy_only_in_exploration():
    module = QModule(observation_space=OBS, action_space=gym.spaces.Discrete(4),
                     model_config={**module_config("q_mlp", QMLPConfig(hiddens=(8,))),
                                   "epsilon": [(0, 1.0), (100, 0.0)]})
    obs = {Columns.OBS: torch.randn(256, 3)}
    greedy = module.compute_q_values(obs)[QF_PREDS].argmax(-1)
    assert torch.equal(module.forward_inference(obs)[Columns.ACTIONS], greedy)
    random = module.forward_exploration(obs, t=0)[Columns.ACTIONS]  # ε = 1: uniform actions
    assert len(torch.unique(random)) == 4 and (random != greedy).float().mean() > 0.5
    assert torch.equal(module.forward_exploration(obs, t=100)[Columns.ACTIONS], greedy)  # ε = 0


def test_module_checkpoint_round_trip_gives_identical_actions(tmp_path):
    module = DDPGModule(observation_space=OBS, action_space=gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
                        model_config=module_config("ddpg_mlp", DDPGMLPConfig(actor_hiddens=(8,), critic_hiddens=(8,))))
    module.save_to_path(str(tmp_path / "m"))
    loaded = RLModule.from_checkpoint(str(tmp_path / "m"))
    obs = {Columns.OBS: torch.randn(16, 3)}
    assert type(loaded) is DDPGModule
    assert torch.equal(module.forward_inference(obs)[Columns.ACTIONS], loaded.forward_inference(obs)[Columns.ACTIONS])


def test_networks_build_without_rllib_and_name_the_policy_tensors():
    """The registered networks are plain torch: building each imports no RLlib. Their parts are the RLModule's
    own, so the tensors of a logged policy keep the names that `rl-eval` loads strictly."""
    code = ("import sys, gymnasium as gym, numpy as np\n"
            "from raycraft.registry import create_model\n"
            "box = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)\n"
            "q = create_model('q_mlp', None, {'observation_space': box, 'action_space': gym.spaces.Discrete(4)})\n"
            "cnn = create_model('q_nature_cnn', None, {'observation_space': gym.spaces.Box(-1.0, 1.0, (84, 84, 4)),"
            " 'action_space': gym.spaces.Discrete(6)})\n"
            "ac = create_model('ddpg_mlp', None, {'observation_space': box, 'action_space': box})\n"
            "print(type(q).__name__, type(cnn).__name__, type(ac).__name__,"
            " sorted(m for m in sys.modules if m.startswith('ray.rllib')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["QNetwork", "QNetwork", "ActorCritic", "[]"]

    q = QModule(observation_space=OBS, action_space=gym.spaces.Discrete(4),
                model_config=module_config("q_mlp", QMLPConfig(hiddens=(8,), head_hiddens=(8,))))
    assert sorted(q.get_state(inference_only=True)) == [
        f"{part}.{i}.{p}" for part, i in (("advantage", 0), ("advantage", 2), ("torso.1", 0), ("value", 0),
                                          ("value", 2)) for p in ("bias", "weight")]
    ddpg = DDPGModule(observation_space=OBS, action_space=gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
                      model_config=module_config("ddpg_mlp", DDPGMLPConfig(actor_hiddens=(8,), critic_hiddens=(8,))))
    assert sorted(ddpg.get_state(inference_only=True)) == [f"actor.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
