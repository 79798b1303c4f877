"""A real headless Chromium for tests: Debian's `chromium`, driven by Playwright."""

from __future__ import annotations

import shutil

from tests.processes import missing_program

# CI installs chromium and sets this, so a missing browser fails there instead of skipping.
REQUIRE_VARIABLE = "SPARC_REQUIRE_BROWSER"


def chromium_executable() -> str:
    """The path of the system's Chromium; skips the test (fails it in CI) when there is none.

    Playwright is given this executable: its own browser downloads are not used.
    """
    found = next(
        (path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))),
        None,
    )
    if found is None:
        missing_program(
            "chromium is not installed (Debian: apt-get install chromium)",
            required_by=REQUIRE_VARIABLE,
        )
    return found
