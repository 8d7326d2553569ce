"""``python -m unifilter_core.cli ...`` (e.g. under ``torchrun``): the same as the ``unifilter`` script."""

import sys

from unifilter_core.cli import main

sys.exit(main())
