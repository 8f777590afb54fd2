"""`personascope traits …` (placeholder, being written)."""

import typer

traits_app = typer.Typer(help="Trait specs: list, show, new.", no_args_is_help=True)
