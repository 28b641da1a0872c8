"""What `make test` needs besides the venv, checked in its first second: a Chromium for the browser tests.

Runs with any Python 3 (before the venv exists). Exit 1 with one line that says what is missing and how to
install it on Debian/Ubuntu, macOS and Windows (WSL).
"""

from __future__ import annotations

import os
import shutil
import sys

# Where each platform's package puts the browser; $CHROMIUM names another one.
CANDIDATES = ["chromium", "chromium-browser", "/usr/bin/chromium",
              "/Applications/Chromium.app/Contents/MacOS/Chromium"]


def find_chromium() -> str | None:
    """The Chromium executable the routing explorer's browser tests start, or None."""
    for name in [os.environ.get("CHROMIUM", ""), *CANDIDATES]:
        found = shutil.which(name) if name and not os.path.isabs(name) else name
        if found and os.access(found, os.X_OK) and os.path.isfile(found):
            return found
    return None


def main() -> int:
    if find_chromium() is None:
        print("error: make test needs Chromium for the routing explorer's browser tests and found none: "
              "Debian/Ubuntu/WSL `sudo apt-get install -y chromium` (Ubuntu: chromium-browser), "
              "macOS `brew install --cask chromium`, or set CHROMIUM=/path/to/chromium", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
