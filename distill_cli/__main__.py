"""``python -m distill_cli <stage> ...`` runs the same command as ``distill-cli``."""

from distill_cli.cli import main

main()
