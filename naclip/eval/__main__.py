"""``python -m naclip.eval ...`` = ``naclip eval ...`` (the entry point for ``torchrun -m naclip.eval``)."""

import sys

from naclip.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
