"""``python -m taskspace`` runs the CLI."""

from taskspace.cli import main

main()
