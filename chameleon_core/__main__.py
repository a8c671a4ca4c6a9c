"""Command line: ``python -m chameleon_core COMMAND --help``."""

from .cli import main

raise SystemExit(main())
