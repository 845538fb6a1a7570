"""``python -m imxp``: the ``imxp`` command (see :mod:`imxp.cli`)."""

import sys

from imxp.cli import main

sys.exit(main())
