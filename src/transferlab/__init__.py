"""transferlab: image classifiers by transfer learning, from a folder of labelled images."""

__version__ = "0.1.0"

# Heavy modules (torch, timm) load on first use, so `transferlab --help` stays instant.
_EXPORTS = {
    "ImageFolderData": "data.folder",
    "train": "workflows.train",
    "Run": "workflows.train",
    "compare": "workflows.compare",
    "evaluate": "workflows.evaluate",
    "load_model": "inference.backends",
    "save_model": "inference.bundle",
    "Predictor": "inference.predictor",
    "create_backbone": "models.backbones",
    "TransferlabError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
