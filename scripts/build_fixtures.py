"""Build (or find cached) every tiny model fixture and link it into the base directory."""
from __future__ import annotations

import logging
import sys
import time

from stylekit.tests.fixtures import FIXTURES, ensure_all
from stylekit.tests.support.host import init_comfy


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[fixtures] %(message)s")
    started = time.monotonic()
    init_comfy()
    ensure_all()
    logging.getLogger("stylekit.fixtures").info(
        "%d fixtures ready in %.1f s", len(FIXTURES), time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
