"""``python -m captum_daam.cli ...`` (and ``torchrun ... -m captum_daam.cli ...``): the
``captum-daam`` command."""

import sys

from captum_daam.cli import main

if __name__ == "__main__":
    sys.exit(main())
