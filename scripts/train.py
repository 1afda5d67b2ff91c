"""Same as ``moe-upcycle train ...``; see ``python scripts/train.py --help``."""

import sys

from moe_upcycle.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
