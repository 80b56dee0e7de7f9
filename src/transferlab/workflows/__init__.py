"""The commands' work, start to end: train (a run directory), compare (many on one split) and
evaluate (a bundle on a labelled folder). They call every layer below and are called by the CLI and
by Python users (transferlab.train, ...)."""
