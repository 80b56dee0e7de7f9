"""The `transferlab` command: one module per command family, each parsing its options (declared in
transferlab/options.py), calling the library and printing the result. torch loads only inside the
commands that need it, so `transferlab --help` is instant."""

from . import commands  # noqa: F401 - registers every command on `app`
from .app import app, main

__all__ = ["app", "main"]
