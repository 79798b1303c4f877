"""Glue for sparc.settings: raw environment strings turned into typed values, and the error
a bad one raises."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?$")
_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True}
_BOOLEANS |= {"false": False, "0": False, "no": False, "off": False}
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_Choice = TypeVar("_Choice", bound=str)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """A setting has a value SPARC cannot use; the message names the variable and the value."""


# Raised and caught as sparc.settings.SettingsError: tracebacks show that public path.
SettingsError.__module__ = "sparc.settings"


class Reader:
    """Turns raw strings into typed values, each failure a SettingsError naming the variable.

    Hand-written, not environs' Env.int/bool/path/timedelta: those read only the process
    environment (load_settings also takes a plain mapping), leave the value out of their
    messages, refuse a blank value instead of taking the default, and differ on what they
    accept (booleans' letter case, `~` in paths, "2 H", negative durations).
    """

    def __init__(self, lookup: Callable[[str], str | None]) -> None:
        self._lookup = lookup

    def _raw(self, name: str) -> str | None:
        value = self._lookup(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def optional_str(self, name: str) -> str | None:
        return self._raw(name)

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a whole number") from None
        if value < minimum:
            raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
        return value

    def seconds(self, name: str, default: float, *, allow_zero: bool) -> float:
        """A duration: plain seconds ("30", "0.5") or with a unit ("250ms", "15m", "12h", "1d")."""
        raw = self._raw(name)
        if raw is None:
            return default
        match = _DURATION.match(raw.lower())
        bound = "0 or more" if allow_zero else "more than 0"
        if match is None:
            raise SettingsError(
                f"{name}={raw!r} is not a duration: give seconds, {bound} "
                "(e.g. 30, 250ms, 15m, 12h)"
            )
        value = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if not math.isfinite(value) or (value == 0 and not allow_zero):
            raise SettingsError(f"{name}={raw!r} must be a duration {bound}")
        return value

    def optional_seconds(self, name: str) -> float | None:
        """A duration more than 0, or None when the variable is unset."""
        if self._raw(name) is None:
            return None
        return self.seconds(name, 0.0, allow_zero=False)

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        """Comma-separated addresses and CIDR ranges ("10.0.0.0/8, 192.0.2.7, ::1")."""
        raw = self._raw(name)
        if raw is None:
            return ()
        networks = []
        for entry in raw.split(","):
            text = entry.strip()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise SettingsError(
                    f"{name}={raw!r}: {text!r} is not an IP address or CIDR range"
                ) from None
        return tuple(networks)

    def choice(self, name: str, choices: tuple[_Choice, ...], default: _Choice) -> _Choice:
        chosen = self.optional_choice(name, choices)
        return default if chosen is None else chosen

    def optional_choice(self, name: str, choices: tuple[_Choice, ...]) -> _Choice | None:
        raw = self._raw(name)
        if raw is None:
            return None
        for choice in choices:
            if raw.lower() == choice:
                return choice
        raise SettingsError(f"{name}={raw!r} is not one of: {', '.join(choices)}")

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        value = _BOOLEANS.get(raw.lower())
        if value is None:
            raise SettingsError(f"{name}={raw!r} is not a boolean: use true or false")
        return value

    def directory(self, name: str) -> Path | None:
        """An existing directory, or None when the variable is unset."""
        raw = self._raw(name)
        if raw is None:
            return None
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise SettingsError(f"{name}={raw!r} is not a directory")
        return path

    def path(self, name: str, default: Path) -> Path:
        raw = self._raw(name)
        if raw is None:
            return default
        return Path(raw).expanduser()
