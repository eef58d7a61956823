"""`python -m kdjax` is the `kdjax` command."""

from kdjax.cli import entry

entry()
