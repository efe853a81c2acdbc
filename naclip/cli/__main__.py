"""``python -m naclip.cli ...`` is the ``naclip`` command (as ``python -m naclip``)."""

import sys

from naclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
