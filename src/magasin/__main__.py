"""`python -m magasin` runs the CLI."""

from magasin.cli import app

app()
