"""Entry point of `python -m open_clip_hn.negatives`."""

import sys

from .cli import main

sys.exit(main())
