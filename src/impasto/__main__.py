"""`python -m impasto`: the `impasto` command."""

from .cli import entry

entry()
