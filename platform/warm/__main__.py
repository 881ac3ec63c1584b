"""`python -m raycraft.warm ENTRY SOCKET`: the warm process, as `raycraft warm start` starts it."""

import sys

from raycraft.warm.server import main

main(*sys.argv[1:])
