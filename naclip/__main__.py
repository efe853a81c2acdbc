"""``python -m naclip ...`` is the ``naclip`` command (see :mod:`naclip.cli`)."""

import sys

from naclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
