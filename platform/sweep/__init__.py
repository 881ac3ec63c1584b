"""Hyperparameter sweeps with Ray Tune, tracked as MLflow parent and child runs; scaling-law fits."""
