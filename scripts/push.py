"""Same as ``moe-upcycle push ...``; see ``python scripts/push.py --help``."""

import sys

from moe_upcycle.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
