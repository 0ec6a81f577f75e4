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
