"""Train an attrclf model: `accelerate launch train.py [--data DIR_OR_HUB_ID] [flags]` (see --help).

Wiring only: attrclf.training holds the steps (the same as `attrclf train` and `accelerate launch -m attrclf train`).
"""

import sys

from attrclf.errors import run_cli
from attrclf.training import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
