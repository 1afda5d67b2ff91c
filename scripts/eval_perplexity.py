"""Same as ``moe-upcycle evaluate ...``; see ``python scripts/eval_perplexity.py --help``.

Not ``evaluate.py``: run as a script, this folder is ``sys.path[0]``, and that name would shadow the ``evaluate``
library that computes the perplexity.
"""

import sys

from moe_upcycle.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
