"""Run ImageShare as ``python -m imageshare``."""

from imageshare.cli import main

raise SystemExit(main())
