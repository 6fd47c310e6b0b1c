"""``python -m switchrl.bench NAME [options]``."""

from switchrl.bench.cli import run

raise SystemExit(run())
