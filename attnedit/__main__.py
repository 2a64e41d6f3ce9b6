"""``python -m attnedit ...`` is the ``attnedit`` command line (also under ``torchrun`` / ``accelerate launch``)."""

import sys

from attnedit.surfaces.cli import main

if __name__ == "__main__":
    sys.exit(main())
