"""``python -m sskd`` is the ``sskd`` command (see :mod:`sskd.cli`)."""

import sys

from sskd.cli import main

sys.exit(main())
