"""`python -m amoeba_hf.cli`: the `amoeba` command."""

import sys

from . import main

sys.exit(main())
