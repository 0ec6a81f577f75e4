"""Reading a weights file runs no code: a pickle that would act when loaded is refused, through the API and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowmo.checkpoint import UnsafeWeightsError, from_checkpoint


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
        from_checkpoint(path)
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


def test_damage_is_not_called_a_payload(tmp_path):
    """A file cut short, an error page saved as .pth and an empty file are unreadable, not malicious; each gets its
    own sentence (with and without mmap, as a resume's step probe reads them)."""
    from flowmo.checkpoint import UnreadableWeightsError, load_weights_file

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    damaged = {
        "cut.pt": good.read_bytes()[: good.stat().st_size // 2],
        "page.pth": b"<html>502</html>",
        "empty.pt": b"",
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        for mmap in (False, True):
            with pytest.raises(UnreadableWeightsError, match="not a readable torch weights file"):
                load_weights_file(tmp_path / name, mmap=mmap)
    assert torch.equal(load_weights_file(good, mmap=True)["w"], torch.ones(3))


def test_validate_with_a_payload_ckpt_path_is_refused_in_one_sentence(tmp_path, capsys):
    from flowmo.commands import main

    marker = tmp_path / "ran"
    path = payload_file(tmp_path, marker)
    root = Path(__file__).resolve().parents[1]
    configs = ["-c", str(root / "configs/base.yaml"), "-c", str(root / "configs/model/tiny.yaml")]
    assert main(["validate", *configs, "--ckpt_path", str(path), "--runs_dir", str(tmp_path / "runs")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert "could run code" in said[-1] and "Traceback" not in "\n".join(said)
    assert not marker.exists()
