"""The common passwords no new password may be: zxcvbn's 30,000, shipped in sparc/data."""

from __future__ import annotations

import functools
from importlib import resources

# Its header names the source and the licence; hatchling puts it in the wheel with the package.
LIST_FILE = "common-passwords.txt"


@functools.cache
def common_passwords() -> frozenset[str]:
    """The list, lowercase; read from the package once, on first use."""
    text = (resources.files("sparc") / "data" / LIST_FILE).read_text(encoding="utf-8")
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def is_common(password: str) -> bool:
    """True when `password`, in any letter case, is on the list."""
    return password.lower() in common_passwords()
