"""Image classifiers (MLP, CNNs): the classification training step and its confusion matrix."""
