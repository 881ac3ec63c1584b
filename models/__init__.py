"""raycraft's model zoo. Importing this package registers every model (see `raycraft models`)."""

from raycraft.models import alexnet, efficientnet, inception, lenet, mlp, resnet, rnn, transformer, vgg  # noqa: F401
from raycraft.text import lm  # noqa: F401  (registers the language-model step)
