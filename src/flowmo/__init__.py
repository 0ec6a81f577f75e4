"""FlowMo image tokenizers: train, evaluate and serve them with PyTorch Lightning.

The public API is re-exported lazily so that `import flowmo` stays cheap (no Lightning import
for users who only need the tokenizer network).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "FlowMoTokenizer": "flowmo.nn.tokenizer",
    "FlowMoConfig": "flowmo.config",
    "FlowMoModule": "flowmo.module",
    "FlowMoDataModule": "flowmo.data.datamodule",
    "presets": "flowmo.presets",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flowmo' has no attribute {name!r}")
    module = import_module(_EXPORTS[name])
    return module if name == "presets" else getattr(module, name)


__all__ = sorted(_EXPORTS)
