"""Same as ``moe-upcycle merge ...``; see ``python scripts/merge.py --help``."""

import sys

from moe_upcycle.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
