import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Tests never download: point every weight cache at an empty place unless a test sets its own.
os.environ.setdefault("TORCH_HOME", str(Path(__file__).parent / ".no_torch_home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def official_fixture():
    return torch.load(FIXTURES / "official_tiny_a.pt", weights_only=False)


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """Tiny sample-set shards (40 px crops, 4 per training photo, 2 per held-out photo), built once."""
    from flowmo.data import build_sample_set

    out = tmp_path_factory.mktemp("sample")
    build_sample_set(out, size=40, train_crops_per_photo=4, val_crops_per_photo=2, shard_size=8)
    return out
