"""The RL benchmark scripts run end to end on raycraft's side (one short seed; SB3 is the `bench` extra's,
which the test install leaves out): a benchmark that crashes after minutes of training reports nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, args, lines", [
    ("rl_cartpole.py", ["--skip-rllib", "--seeds", "0"], ["raycraft     seed 0: steps"]),
    ("rl_pendulum.py", ["--skip-portfolio", "--episodes", "2", "--eval-episodes", "1"],
     ["ddpg      mean return over 2 episodes", "heuristic mean return over 2 episodes"]),
])
def test_rl_benchmark_runs_and_reports(script, args, lines, tmp_path):
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--skip-sb3", "--max-steps", "1000",
                          "--set", "learning_starts=500"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in [*lines, "raycraft     solved 0/1  median steps"]:
        assert line in out.stdout, out.stdout[-3000:]
