"""`python -m raycraft ...`: the CLI, as the entrypoint of jobs that `raycraft submit` sends to a cluster.
A job runs in its own process, in the job's runtime environment, never in a fork of a warm raycraft."""

from raycraft.cli import main

main(use_warm=False)
