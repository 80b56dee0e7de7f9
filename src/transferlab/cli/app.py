"""The typer app, its entry point and what every command shares: the consoles, logging, and the
one-line error. torch loads only inside the commands that need it, so `transferlab --help` is
instant."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import TransferlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # help texts show "[default: ...]" literally
                  help="Train image classifiers by transfer learning from a folder of labelled images.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error, one line


def main() -> None:
    """Console-script entry point: user errors become one line on stderr, not a traceback."""
    try:
        app()
    except TransferlabError as error:
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


def setup_logging(verbose: bool = True) -> None:
    """Rich log lines on a terminal; plain "LEVEL: message" lines otherwise, so that a file name in
    a warning is never wrapped mid-word in a CI log or a redirected file."""
    from rich.logging import RichHandler

    if err.is_terminal:
        handler: logging.Handler = RichHandler(console=err, show_time=False, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def given(**options) -> dict:
    """Only the options the user set: None never overrides a library default."""
    return {k: v for k, v in options.items() if v is not None}
