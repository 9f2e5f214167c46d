"""`python -m semantic_cli`: the same as the `semantic` command."""

from .cli.app import main

main()
