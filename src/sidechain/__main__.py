"""``python -m sidechain``: the same as the ``sidechain`` command."""

from .cli import main

raise SystemExit(main())
