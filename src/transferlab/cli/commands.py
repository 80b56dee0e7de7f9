"""Every command, registered on the app in the order --help lists them."""

from . import data, train, evaluate, predict, deploy, models  # noqa: F401
