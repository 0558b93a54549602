"""``python -m studies ...`` (the same as ``mpc-fi study ...``)."""

import sys

from .cli import study_main

sys.exit(study_main())
