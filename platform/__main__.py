"""`python -m raycraft ...`: the CLI, as the entrypoint of jobs that `raycraft submit` sends to a cluster."""

from raycraft.cli import main

main()
