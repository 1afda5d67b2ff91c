"""Upcycle a dense checkpoint into a sparse MoE checkpoint; the same as ``moe-upcycle convert``.

    python scripts/convert.py SOURCE OUTPUT --num-experts 8 --top-k 2 --layers all --verify
"""

import os
import sys

# Run as a script, this folder is sys.path[0], and scripts/evaluate.py would shadow the `evaluate` library.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from moe_upcycle.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
