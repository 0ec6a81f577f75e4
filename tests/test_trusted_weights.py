"""Reading a weights file runs no code: a pickle that would act when loaded is refused, through the API and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmo.checkpoint import UnsafeWeightsError
from flowmo.nn.tokenizer import FlowMoTokenizer


class Payload:
    """Unpickled with weights_only=False, it creates `marker`: the stand-in for any code a stranger's file runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload_file(folder: Path, marker: Path) -> Path:
    """A file shaped like an exported tokenizer whose state dict carries the payload."""
    path = folder / "payload.pt"
    torch.save({"flowmo_config": {}, "state_dict": {"w": torch.zeros(1)}, "extra": Payload(marker)}, path)
    return path


def test_the_payload_is_live_when_read_without_weights_only(tmp_path):
    """The check below means something: the same file does run code under weights_only=False."""
    marker = tmp_path / "ran"
    torch.load(payload_file(tmp_path, marker), weights_only=False)
    assert marker.exists()


def test_from_checkpoint_refuses_a_payload_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = payload_file(tmp_path, marker)
    with pytest.raises(UnsafeWeightsError) as error:
        FlowMoTokenizer.from_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "save_pretrained" in message and "\n" not in message
    assert not marker.exists()


def test_the_cli_refuses_a_payload_in_one_sentence(tmp_path):
    marker = tmp_path / "ran"
    path = payload_file(tmp_path, marker)
    photo = Path(__file__).resolve().parents[1] / "docs" / "demo" / "grid.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowmo",
            "reconstruct",
            "--tokenizer",
            str(path),
            str(photo),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode != 0 and not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and str(path) in lines[0], result.stderr


@pytest.mark.parametrize("network", ["lpips", "resnet"])
def test_a_payload_as_feature_network_weights_is_refused(tmp_path, network):
    from flowmo.perceptual import LPIPSDistance, ResNetLogitsDistance

    marker = tmp_path / "ran"
    path = payload_file(tmp_path, marker).rename(tmp_path / "resnet50-0676ba61.pth")
    with pytest.raises(UnsafeWeightsError, match="refused"):
        LPIPSDistance("alex", weights=path) if network == "lpips" else ResNetLogitsDistance(weights=path)
    assert not marker.exists()
