"""``python -m fincast ...``: the CLI, also as torchrun launches it (``torchrun --nproc_per_node=N -m fincast train ...``)."""

import sys

from fincast.cli import main

sys.exit(main())
