"""``python -m fincast.cli ...``: the same as ``python -m fincast ...``."""

import sys

from fincast.cli.commands import main

sys.exit(main())
