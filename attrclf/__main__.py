"""`python -m attrclf COMMAND ...`, the same as the `attrclf` console script (so `accelerate launch -m attrclf train`
works)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
