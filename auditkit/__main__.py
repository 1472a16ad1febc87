"""`python -m auditkit` is the `auditkit` command."""

from .cli import main

main()
