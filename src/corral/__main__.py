"""`python -m corral` runs the CLI (the detached daemon starts itself this way)."""

from corral.cli.main import main

main()
