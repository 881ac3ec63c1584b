"""raycraft's model zoo. Importing this package registers every model (see `raycraft models`)."""

from raycraft.models import alexnet, efficientnet, inception, lenet, mlp, resnet, rl, vgg  # noqa: F401
