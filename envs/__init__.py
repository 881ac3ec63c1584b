"""raycraft's own environments for its RL agents, registered with gymnasium by id.

`raycraft/Portfolio-v0` (`raycraft.envs.portfolio`) is registered on import. Building any environment by
name (these, Atari games, every gymnasium id) and registering it with RLlib is the rl family's job
(`raycraft.rl.environments`); this package holds the environments themselves and needs only gymnasium.
"""

from __future__ import annotations

import gymnasium as gym

PORTFOLIO = "raycraft/Portfolio-v0"
ATARI_PREFIX = "ALE/"
"""gymnasium's namespace of the Atari games (`ALE/Pong-v5`), which ale-py registers."""

gym.register(id=PORTFOLIO, entry_point="raycraft.envs.portfolio:PortfolioEnv")
