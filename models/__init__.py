"""raycraft's model zoo. Importing this package registers every model (see `raycraft models`)."""

from raycraft.models import (  # noqa: F401
    alexnet,
    ddpm,
    deep_kalman,
    efficientnet,
    gan,
    gnn,
    inception,
    kalman,
    lenet,
    mlp,
    resnet,
    rl,
    rnn,
    transformer,
    vae,
    vgg,
)
