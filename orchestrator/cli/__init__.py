"""The `flashflex` command: a typer app, one module per command group, wired in orchestrator.cli.main."""
