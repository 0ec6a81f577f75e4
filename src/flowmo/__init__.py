"""FlowMo image tokenizers: train, evaluate and serve them with PyTorch Lightning.

The public API is re-exported lazily so that `import flowmo` stays cheap (no Lightning import
for users who only need the tokenizer network):

    tok = flowmo.from_pretrained("lo")          # a FlowMoTokenizer; or from_checkpoint(path), from_official(file)
    flowmo.save_pretrained(tok, "tok/")         # model.safetensors + config.json + model card; push_to_hub(tok, id)
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "FlowMoTokenizer": "flowmo.nn.tokenizer",
    "FlowMoConfig": "flowmo.config",
    "FlowMoModule": "flowmo.module",
    "FlowMoDataModule": "flowmo.data.datamodule",
    "presets": "flowmo.presets",
    # weights in and out of a FlowMoTokenizer (outside flowmo.nn, which stays pure torch)
    "from_pretrained": "flowmo.hub",
    "save_pretrained": "flowmo.hub",
    "push_to_hub": "flowmo.hub",
    "from_checkpoint": "flowmo.checkpoint",
    "from_official": "flowmo.checkpoint",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flowmo' has no attribute {name!r}")
    module = import_module(_EXPORTS[name])
    return module if name == "presets" else getattr(module, name)


__all__ = sorted(_EXPORTS)
