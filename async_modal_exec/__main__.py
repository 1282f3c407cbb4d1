"""``python -m async_modal_exec``: see :mod:`async_modal_exec.cli`."""

import sys

from .cli import main

raise SystemExit(main(sys.argv[1:]))
