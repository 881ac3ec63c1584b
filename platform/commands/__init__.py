"""raycraft's core commands, one typer `app` per module, grouped by what they import: `catalog` (models,
datasets: the registry only), `train` (train, eval: torch, Ray Train), `runs` (runs: the MLflow store). The
command line imports a module only to run one of its commands."""
