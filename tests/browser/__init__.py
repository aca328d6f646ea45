"""Browser tests of the worklist page: Debian's chromium driven by playwright (never downloaded)."""

import os
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# The flags that run Debian's chromium headless on these machines (../shared/ENVIRONMENT.md);
# playwright gives every browser its own temporary profile (--user-data-dir).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
VIEWPORT = {"width": 1440, "height": 900}


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (with the fix), or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]'"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: apt-get install chromium (make services)"
    return None
