"""raycraft's model zoo. Importing this package registers every model (see `raycraft models`)."""

from raycraft.models import alexnet, ddpm, efficientnet, gan, inception, lenet, mlp, resnet, vae, vgg  # noqa: F401
