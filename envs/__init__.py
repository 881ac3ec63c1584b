"""Environments for raycraft's RL agents, registered for gymnasium and RLlib by name."""
