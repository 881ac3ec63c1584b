"""State-space models (Kalman filter, deep Kalman filter): the time-series training step and its plots."""
