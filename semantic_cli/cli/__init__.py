"""The command line: Typer commands (parse, call the core, render), the REPL, slash commands and rendering.

Nothing below `semantic_cli.cli` is imported by the core; the core never prints."""
