"""``python -m lmstack ...``: the ``lmstack`` command, as ``torchrun ... -m lmstack pretrain ...`` launches it."""

import sys

from lmstack.cli import main

if __name__ == "__main__":
    sys.exit(main())
