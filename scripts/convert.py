"""Upcycle a dense checkpoint into a sparse MoE checkpoint; the same as ``moe-upcycle convert``.

    python scripts/convert.py SOURCE OUTPUT --num-experts 8 --top-k 2 --layers all --verify
"""

import sys

from moe_upcycle.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
