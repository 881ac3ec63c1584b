"""Reinforcement learning on RLlib's new API stack: raycraft's RLModules, DDPG, the `rl` CLI commands."""
