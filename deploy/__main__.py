"""``python -m deploy``: the local deployment's command line (:mod:`deploy.cli`)."""

from __future__ import annotations

import sys

from deploy.cli import main

if __name__ == "__main__":
    sys.exit(main())
