"""`personascope judges …` (placeholder, being written)."""

import typer

judges_app = typer.Typer(help="Judges: validate against labelled answers.", no_args_is_help=True)
