"""``python -m harness``: the ``hwharness`` command."""

from .tools.cli import main

raise SystemExit(main())
