"""The typer app, its entry point and what every command shares: the consoles, logging, and the
one-line error. torch loads only inside the commands that need it, so `transferlab --help` is
instant."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import TransferlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # help texts show "[default: ...]" literally
                  help="Train image classifiers by transfer learning from a folder of labelled images.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error, one line


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that nothing on the way
    out swallows it; unlike KeyboardInterrupt, Lightning does not turn it into exit status 1 (nor
    its own SIGTERM handling into 0)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame) -> None:
    raise Stopped(signum)


def main() -> None:
    """Console-script entry point: user errors become one line on stderr, not a traceback (exit 2);
    Ctrl-C and SIGTERM stop with one line, and 130 or 143, as shells and service managers expect."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed, escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # only it can take signals
        handlers = {signum: signal.signal(signum, _stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        app()
    except TransferlabError as error:
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        sys.exit(2)
    except (Stopped, KeyboardInterrupt) as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        err.print("interrupted" if signum == signal.SIGINT else "terminated", highlight=False)
        sys.exit(128 + signum)
    except OSError as error:  # a full disk, a folder that vanished: what was written before holds
        where = f"{error.filename}: " if error.filename else ""
        err.print(f"[bold red]error:[/] {escape(where + (error.strerror or str(error)))}", highlight=False)
        sys.exit(1)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def setup_logging(verbose: bool = True) -> None:
    """Rich log lines on a terminal; plain "LEVEL: message" lines otherwise, so that a file name in
    a warning is never wrapped mid-word in a CI log or a redirected file. `verbose`: our own INFO
    lines too; other libraries' only from WARNING (building a graph, the ONNX exporter's optimiser
    logged some 80 INFO lines)."""
    from rich.logging import RichHandler

    if err.is_terminal:
        handler: logging.Handler = RichHandler(console=err, show_time=False, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(lambda record: record.levelno >= logging.WARNING
                      or record.name.partition(".")[0] == "transferlab")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


def given(**options) -> dict:
    """Only the options the user set: None never overrides a library default."""
    return {k: v for k, v in options.items() if v is not None}
