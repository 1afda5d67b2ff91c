"""The main job on the embedded default: build a small dense Llama, upcycle it, verify it, generate.

    python scripts/demo.py [--workdir demo_run]
"""

import sys

from moe_upcycle.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
