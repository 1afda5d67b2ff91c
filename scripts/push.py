"""Same as ``moe-upcycle push ...``; see ``python scripts/push.py --help``."""

import os
import sys

# Run as a script, this folder is sys.path[0], and scripts/evaluate.py would shadow the `evaluate` library.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from moe_upcycle.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
