"""Optional dependencies: a command or dataset that needs one of raycraft's extras says so before it starts."""

from __future__ import annotations

import re
from importlib import metadata

from raycraft.errors import UserError

_EXTRA = re.compile(r"""extra\s*==\s*["']([\w-]+)["']""")


def extra_distributions(extra: str) -> list[str]:
    """The distributions that `raycraft[extra]` adds, read from raycraft's installed metadata."""
    names = []
    for requirement in metadata.requires("raycraft") or []:
        marker = _EXTRA.search(requirement)
        if marker and marker.group(1) == extra:
            names.append(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
    return names


def require_extra(extra: str, what: str) -> None:
    """Raise a UserError (exit 2) naming the pip line when a distribution of `raycraft[extra]` is missing."""
    missing = []
    for name in extra_distributions(extra):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise UserError(f"{what} needs raycraft's {extra!r} extra ({', '.join(missing)} not installed): "
                        f"pip install 'raycraft[{extra}]' (in a checkout: pip install -e '.[{extra}]').")
