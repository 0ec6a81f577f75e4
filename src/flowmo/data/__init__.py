"""Data: WebDataset shard writer, the FlowMoDataModule, transforms and the embedded sample set.

Exports are loaded lazily: the shard writer's worker processes import `flowmo.data.shards` without paying for
Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "FlowMoDataModule": "flowmo.data.datamodule",
    "resolve_shards": "flowmo.data.datamodule",
    "ShardStream": "flowmo.data.stream",
    "write_shards": "flowmo.data.shards",
    "build_sample_set": "flowmo.data.sample_set",
    "train_transform": "flowmo.data.transforms",
    "val_transform": "flowmo.data.transforms",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flowmo.data' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
