"""A trained tokenizer shared the way huggingface_hub shares models: flowmo.hub's save_pretrained / from_pretrained (a
folder, a Hub repository through a loopback HF_ENDPOINT) / push_to_hub / `flowmo export --out DIR`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from flowmo.checkpoint import export_tokenizer, from_checkpoint
from flowmo.commands import main
from flowmo.errors import UserError
from flowmo.hub import from_pretrained, push_to_hub, save_pretrained
from flowmo.nn.tokenizer import FlowMoTokenizer
from loopback import Loopback, online  # noqa: F401 (online: a fixture)


@pytest.fixture(scope="module")
def tiny() -> FlowMoTokenizer:
    torch.manual_seed(0)
    return FlowMoTokenizer.from_preset("tiny").eval()


def images(tokenizer: FlowMoTokenizer) -> torch.Tensor:
    size = tokenizer.config.image_size
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def assert_same(a: FlowMoTokenizer, b: FlowMoTokenizer) -> None:
    assert a.config == b.config and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())
    with torch.no_grad():
        assert torch.equal(a.tokenize(images(a)), b.tokenize(images(a)))


def test_a_folder_round_trip_is_bit_equal_in_weights_and_token_ids(tiny, tmp_path):
    folder = save_pretrained(tiny, tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == tiny.config.to_dict()
    assert_same(tiny, from_pretrained(folder))
    assert_same(tiny, from_checkpoint(folder))  # where a checkpoint is accepted, a folder is too
    card = (folder / "README.md").read_text()
    assert "library_name: flowmo" in card and "bits per pixel" in card and "sampler" in card
    assert f"{tiny.config.bits_per_pixel:.4g}" in card and "No evaluation figures" in card


def test_the_card_quotes_the_runs_metrics(tiny, tmp_path):
    report = {"metrics": {"psnr": 21.4562, "rfid": 3.25}, "num_images": 48, "checkpoint": "runs/x/last.ckpt"}
    (tmp_path / "metrics.json").write_text(json.dumps(report))
    card = (save_pretrained(tiny, tmp_path / "tok", metrics=tmp_path / "metrics.json") / "README.md").read_text()
    assert "| psnr | 21.4562 |" in card and "| rfid | 3.25 |" in card and "48 images" in card


def test_export_writes_the_same_folder_and_the_old_pt_is_still_read(tiny, tmp_path, capsys):
    old = export_tokenizer(tiny, tmp_path / "tok.pt")
    assert main(["export", "--ckpt", str(old), "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "model.safetensors").is_file()
    assert_same(tiny, from_pretrained(tmp_path / "tok"))
    assert_same(tiny, from_checkpoint(old))


def test_a_folder_without_its_files_is_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model.safetensors or config.json"):
        from_pretrained(tmp_path / "empty")


def hub_routes(folder: Path, repo_id: str, revision: str) -> dict[str, bytes]:
    return {f"/{repo_id}/resolve/{revision}/{p.name}": p.read_bytes() for p in folder.iterdir()}


def test_a_hub_repository_downloads_through_hf_endpoint_then_reads_offline(tiny, tmp_path, online, monkeypatch):
    folder = save_pretrained(tiny, tmp_path / "tok")
    server = Loopback(hub_routes(folder, "someone/tiny-tok", "v1"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        loaded = from_pretrained("someone/tiny-tok", revision="v1", cache_dir=tmp_path / "cache")
    finally:
        server.close()
    assert_same(tiny, loaded)
    blobs = {p.name for p in (tmp_path / "cache").rglob("blobs/*")}
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() in blobs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server is gone: the cache alone serves it
    assert_same(tiny, from_pretrained("someone/tiny-tok", revision="v1", cache_dir=tmp_path / "cache"))


def test_a_missing_hub_repository_is_one_sentence(online, monkeypatch):
    server = Loopback({})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        with pytest.raises(UserError) as error:
            from_pretrained("someone/nothing")
    finally:
        server.close()
    message = str(error.value)
    assert (
        "someone/nothing/config.json" in message
        and "HTTP 404" in message
        and "hf download someone/nothing" in message
        and "\n" not in message
    )


def test_unknown_names_and_pinned_releases_say_what_to_give():
    with pytest.raises(UserError, match="released name .lo, hi., a folder"):
        from_pretrained("not a name")
    with pytest.raises(UserError, match="pinned"):
        from_pretrained("lo", revision="main")


def test_push_to_hub_uploads_the_save_pretrained_folder(tiny, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def upload_folder(self, repo_id, folder_path, commit_message):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        calls["upload"] = (repo_id, commit_message, self.endpoint)
        return "http://127.0.0.1/commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: calls.setdefault("create", repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert push_to_hub(tiny, "someone/tiny-tok") == "http://127.0.0.1/commit"
    assert calls["create"] == "someone/tiny-tok" and calls["upload"][0] == "someone/tiny-tok"
    assert calls["upload"][2] == "http://127.0.0.1:9"  # HF_ENDPOINT read at call time, like every download
    assert_same(tiny, from_pretrained(tmp_path / "uploaded"))
