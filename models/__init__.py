"""raycraft's model zoo. Importing this package registers every model (see `raycraft models`)."""

from raycraft.models import (  # noqa: F401
    alexnet,
    deep_kalman,
    efficientnet,
    gnn,
    inception,
    kalman,
    lenet,
    mlp,
    resnet,
    timeseries,
    vgg,
)
