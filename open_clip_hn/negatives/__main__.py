"""Entry point of `python -m open_clip_hn.negatives`."""

from .cli import main
from .cli_common import exit_command

exit_command(main())
