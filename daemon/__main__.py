"""`python -m inferencecenter.daemon` is the `inferencecenter` command."""

import sys

from .cli import main

sys.exit(main())
