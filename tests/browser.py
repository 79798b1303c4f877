"""A real headless Chromium for tests: Debian's `chromium`, driven by Playwright."""

from __future__ import annotations

from tests.programs import debian_program

# CI installs chromium and sets this, so a missing browser fails there instead of skipping.
REQUIRE_VARIABLE = "SPARC_REQUIRE_BROWSER"


def chromium_executable() -> str:
    """The path of the system's Chromium; skips the test (fails it in CI) when there is none.

    Playwright is given this executable: its own browser downloads are not used.
    """
    return debian_program("chromium", package="chromium", require_variable=REQUIRE_VARIABLE)
