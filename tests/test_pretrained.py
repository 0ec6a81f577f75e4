"""Pretrained files arrive by themselves, and only as the files their addresses promise.

Nothing here leaves the machine: downloads come from an HTTP server on the loopback address that plays
download.pytorch.org (torch hub files) or the Hugging Face Hub (HF_ENDPOINT), and the released-checkpoint tests
read a Hugging Face cache the test fills itself, under HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flowmo import pretrained
from flowmo.checkpoint import RELEASES
from flowmo.commands import main
from flowmo.hub import from_pretrained
from flowmo.perceptual import LPIPSDistance, StandInWeightsWarning
from flowmo.pretrained import FILES, MissingWeightsError, WeightsHashError
from loopback import Loopback, Misbehaving, online  # noqa: F401 (online: a fixture)
from module_fields import module_with


def torch_bytes(state: dict) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def alexnet_trunk_state(seed: int = 0) -> dict:
    """A torchvision-layout AlexNet features file (what download.pytorch.org serves, minus the classifier)."""
    with pytest.warns(StandInWeightsWarning):
        trunk = LPIPSDistance("alex", weights="random").net.net
    generator = torch.Generator().manual_seed(seed)
    return {
        "features." + k.split(".", 1)[1]: torch.randn(v.shape, generator=generator)
        for k, v in trunk.state_dict().items()
    }


def serve_as_alexnet(monkeypatch, data: bytes, name_hash: str | None = None, cut: bool = False) -> Loopback:
    """FILES["alexnet"] pointed at the loopback server, its name carrying the hash prefix torch hub checks."""
    prefix = name_hash or hashlib.sha256(data).hexdigest()[:8]
    filename = f"alexnet-test-{prefix}.pth"
    server = Loopback({f"/models/{filename}": data}, cut={f"/models/{filename}"} if cut else set())
    spec = replace(FILES["alexnet"], filename=filename, url=f"{server.url}/models/{filename}")
    monkeypatch.setitem(FILES, "alexnet", spec)
    return server


# ------------------------------------------------------------------------------------------- torch hub files
def test_the_addresses_are_the_libraries_own():
    import pytorch_fid.inception
    import timm
    import torchvision.models as models

    assert FILES["vgg16"].url == models.VGG16_Weights.IMAGENET1K_V1.url
    assert FILES["alexnet"].url == models.AlexNet_Weights.IMAGENET1K_V1.url
    assert FILES["inception_fid"].url == pytorch_fid.inception.FID_WEIGHTS_URL
    assert timm.models.get_pretrained_cfg("resnet50.tv_in1k").hf_hub_id == FILES["resnet50"].repo_id
    for key in ("vgg16", "alexnet", "inception_fid"):
        assert FILES[key].url.endswith("/" + FILES[key].filename)


def test_first_use_downloads_into_the_torch_hub_cache_then_reads_it_offline(online, monkeypatch):
    state = alexnet_trunk_state()
    data = torch_bytes(state)
    server = serve_as_alexnet(monkeypatch, data)
    try:
        lpips = LPIPSDistance("alex")
    finally:
        server.close()
    cached = online / "torch" / "hub" / "checkpoints" / FILES["alexnet"].filename
    assert cached.read_bytes() == data and server.requests == [("GET", f"/models/{cached.name}")]
    assert not lpips.is_stand_in
    torch.testing.assert_close(lpips.net.net.slice1[0].weight, state["features.0.weight"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server is gone: the cache alone serves the second build
    again = LPIPSDistance("alex")
    torch.testing.assert_close(again.net.net.slice1[0].weight, state["features.0.weight"])
    assert not list(cached.parent.glob("*.partial"))


def test_a_file_whose_hash_does_not_match_is_deleted_and_refused(online, monkeypatch):
    server = serve_as_alexnet(monkeypatch, torch_bytes(alexnet_trunk_state()), name_hash="00000000")
    try:
        with pytest.raises(WeightsHashError) as error:
            LPIPSDistance("alex")
    finally:
        server.close()
    message = str(error.value)
    assert FILES["alexnet"].address in message and "deleted" in message and "\n" not in message
    folder = online / "torch" / "hub" / "checkpoints"
    assert not (folder / FILES["alexnet"].filename).exists() and not list(folder.glob("*.partial"))


def test_a_transfer_cut_short_leaves_nothing_under_the_final_name(online, monkeypatch):
    server = serve_as_alexnet(monkeypatch, torch_bytes(alexnet_trunk_state()), cut=True)
    try:  # urllib may see a short body as a complete one: the hash check is what catches it
        with pytest.raises((WeightsHashError, MissingWeightsError), match="cut short"):
            LPIPSDistance("alex")
    finally:
        server.close()
    folder = online / "torch" / "hub" / "checkpoints"
    assert not (folder / FILES["alexnet"].filename).exists() and not list(folder.glob("*.partial"))


def test_no_network_gives_one_sentence_with_file_address_and_cache(online, monkeypatch):
    server = serve_as_alexnet(monkeypatch, b"unused")
    server.close()  # nothing listens on that port any more: the connection is refused
    with pytest.raises(MissingWeightsError) as error:
        LPIPSDistance("alex")
    spec, message = FILES["alexnet"], str(error.value)
    assert spec.filename in message and spec.address in message and str(spec.cache_folder()) in message
    assert "the connection was refused" in message and "left nothing in" in message and "\n" not in message


def test_offline_mode_never_connects(online, monkeypatch):
    server = serve_as_alexnet(monkeypatch, torch_bytes(alexnet_trunk_state()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE=1 forbids downloading"):
            LPIPSDistance("alex")
    finally:
        server.close()
    assert server.requests == []


# ------------------------------------------------------------------------------------------- Hugging Face files
def serve_as_hub(monkeypatch, key: str, data: bytes, announce: str | None = None) -> Loopback:
    """The Hub's resolve address of FILES[key] on the loopback server (HF_ENDPOINT)."""
    spec = FILES[key]
    route = f"/{spec.repo_id}/resolve/{spec.revision or 'main'}/{spec.filename}"
    server = Loopback({route: data}, announce={route: announce} if announce else None)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    return server


def test_hub_download_lands_in_the_hf_cache_with_its_hash_checked(online, monkeypatch):
    data = b"weights of a released tokenizer" * 1000
    server = serve_as_hub(monkeypatch, "official-lo", data)
    try:
        path = pretrained.fetch("official-lo")
    finally:
        server.close()
    assert path.read_bytes() == data and str(path).startswith(str(online / "hf"))
    assert path.resolve().name == hashlib.sha256(data).hexdigest()  # the HF cache's blob layout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pretrained.fetch("official-lo") == path  # cached: no server needed


def test_hub_file_that_is_not_the_announced_one_is_deleted(online, monkeypatch):
    data = b"not the file the Hub announced" * 1000
    server = serve_as_hub(monkeypatch, "official-lo", data, announce=hashlib.sha256(b"the real one").hexdigest())
    try:
        with pytest.raises(WeightsHashError, match="deleted"):
            pretrained.fetch("official-lo")
    finally:
        server.close()
    assert pretrained.cached(FILES["official-lo"]) is None
    assert not [p for p in (online / "hf").rglob("*") if p.is_file() and p.stat().st_size == len(data)]


# ------------------------------------------------------------------------------------------- released checkpoints
def fill_hf_cache(cache: Path, repo_id: str, filename: str, data: bytes, commit: str = "b" * 40) -> Path:
    """What huggingface_hub leaves after a download: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return link


@pytest.fixture
def released_tiny(tmp_path, monkeypatch, official_fixture):
    """An offline machine whose Hugging Face cache holds the authors' tiny fixture as `flowmo_lo.pth`."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    released = {
        "model_ema_state_dict": official_fixture["official_state_dict"],
        "model_state_dict": official_fixture["official_state_dict"],
    }
    fill_hf_cache(tmp_path / "hf", "ksarge/FlowMo", "flowmo_lo.pth", torch_bytes(released))
    return official_fixture


def test_from_pretrained_reads_the_hf_cache_offline(released_tiny, monkeypatch):
    monkeypatch.setitem(RELEASES, "lo", ("official-lo", "tiny"))  # the fixture's architecture is the tiny preset
    tokenizer = from_pretrained("lo")
    with torch.no_grad():
        code = tokenizer.encode(released_tiny["images"])
    assert (code - released_tiny["encoder_code"]).abs().max() <= 1e-4


def test_a_released_name_holding_another_architecture_is_refused(released_tiny):
    with pytest.raises(ValueError, match="flowmo_lo.pth is not the released FlowMo-lo .the lo preset.") as error:
        from_pretrained("lo")  # a tiny file where FlowMo-Lo is expected
    assert "wrong shapes" in str(error.value) and "more" in str(error.value)  # a long list, shortened


def test_released_names_are_lo_and_hi_only():
    with pytest.raises(ValueError, match="lo, hi"):
        from_pretrained("mid")


def test_from_pretrained_offline_and_not_cached_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError) as error:
        from_pretrained("hi")
    message = str(error.value)
    assert "flowmo_hi.pth" in message and "https://huggingface.co/ksarge/FlowMo/resolve/main/flowmo_hi.pth" in message
    assert str(tmp_path / "empty") in message and "flowmo fetch-weights" in message


def test_released_names_work_where_a_pth_is_accepted(released_tiny, monkeypatch, tmp_path, capsys):
    """The file tools and `model.init.weights` take `lo` like a path."""
    from PIL import Image

    monkeypatch.setitem(RELEASES, "lo", ("official-lo", "tiny"))
    module = module_with(preset="tiny", weights="lo", perceptual="none")
    expected = from_pretrained("lo").state_dict()
    assert all(torch.equal(value, module.tokenizer.state_dict()[key]) for key, value in expected.items())
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 36), (200, 30, 90)).save(photos / "red.png")
    assert main(["tokenize", "--tokenizer", "lo", str(photos), "--out", str(tmp_path / "ids"), "--device", "cpu"]) == 0
    assert (tmp_path / "ids" / "red.npy").is_file()


def test_init_weights_of_a_released_name_into_another_architecture_is_refused(released_tiny, monkeypatch):

    monkeypatch.setitem(RELEASES, "lo", ("official-lo", "tiny"))
    with pytest.raises(ValueError, match="another architecture"):
        module_with(preset="demo", weights="lo", perceptual="none")


# ------------------------------------------------------------------------------------------- flowmo fetch-weights
def test_fetch_weights_prints_where_each_file_is(tmp_path, monkeypatch, capsys):

    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    for key in ("vgg16", "alexnet"):
        (folder / FILES[key].filename).write_bytes(b"cached")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["fetch-weights", "lpips"]) == 0
    out = capsys.readouterr().out
    assert str(folder / FILES["vgg16"].filename) in out and str(folder / FILES["alexnet"].filename) in out
    assert "lpips heads" in out
    assert main(["fetch-weights", "inception"]) == 2  # offline, not cached: one sentence, no traceback
    err = capsys.readouterr().err
    assert FILES["inception_fid"].address in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- download failures
@contextlib.contextmanager
def failing_server(kind: str, files: dict[str, bytes]):
    """The base address of a server that fails the way `kind` says: refused, dropped, stalled, 403, 404."""
    if kind == "refused":
        server = Loopback({})
        server.close()  # nothing listens on that port any more
        yield server.url
        return
    server = (
        Misbehaving("stall" if kind == "stalled" else "drop")
        if kind in ("dropped", "stalled")
        else Loopback(files, status=int(kind))
    )
    try:
        yield server.url
    finally:
        server.close()


FAILURES = ["refused", "dropped", "stalled", "403", "404"]


def assert_one_sentence(message: str, spec, cache: Path) -> None:
    assert spec.label in message and spec.address in message and str(cache) in message, message
    assert f"flowmo fetch-weights {spec.group}" in message and "\n" not in message and message.count(". ") == 0


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failed_hub_download_is_one_sentence_within_the_timeout(online, monkeypatch, kind):
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    spec = FILES["official-lo"]
    with failing_server(kind, {f"/{spec.repo_id}/resolve/main/{spec.filename}": b"x" * 1000}) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        start = time.monotonic()
        with pytest.raises(MissingWeightsError) as error:
            pretrained.fetch("official-lo")
        assert time.monotonic() - start < 5
        assert url in spec.address  # the mirror's address, not the Hub's, is the one named
    assert_one_sentence(str(error.value), spec, online / "hf")
    assert not [p for p in (online / "hf").rglob("*") if p.is_file() and "blobs" in p.parts]


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failed_torch_hub_download_is_one_sentence_within_the_timeout(online, monkeypatch, kind):
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    name = "alexnet-test-00000000.pth"
    with failing_server(kind, {f"/models/{name}": b"x" * 1000}) as url:
        spec = replace(FILES["alexnet"], filename=name, url=f"{url}/models/{name}")
        monkeypatch.setitem(FILES, "alexnet", spec)
        start = time.monotonic()
        with pytest.raises(MissingWeightsError) as error:
            pretrained.fetch("alexnet")
        assert time.monotonic() - start < 5
    folder = online / "torch" / "hub" / "checkpoints"
    assert_one_sentence(str(error.value), spec, folder)
    assert not [p for p in folder.iterdir() if not p.name.endswith(".lock")]


def test_the_mirror_variable_points_torch_hub_files_elsewhere(online, monkeypatch, tmp_path):
    data = torch_bytes(alexnet_trunk_state())
    name = f"alexnet-test-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    monkeypatch.setitem(FILES, "alexnet", replace(FILES["alexnet"], filename=name, url=f"http://127.0.0.1:9/{name}"))
    mirror = tmp_path / "mirror"  # a shared folder as file://; an http:// mirror is read the same way
    mirror.mkdir()
    (mirror / name).write_bytes(data)
    monkeypatch.setenv("FLOWMO_WEIGHTS_MIRROR", mirror.as_uri())
    assert FILES["alexnet"].address == f"{mirror.as_uri()}/{name}"
    assert pretrained.fetch("alexnet").read_bytes() == data


def test_fetch_weights_goes_on_past_a_failure_and_ends_with_a_table(online, monkeypatch, capsys):

    hi = FILES["official-hi"]
    server = Loopback({f"/{hi.repo_id}/resolve/main/{hi.filename}": b"hi weights" * 100})  # no flowmo_lo.pth: 404
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        assert main(["fetch-weights", "official-lo", "official-hi"]) == 2
    finally:
        server.close()
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:3]}
    assert rows == {"official-lo": "failed", "official-hi": "fetched"}, out
    assert "1 of 2 files failed (official-lo)" in out and "HTTP 404" in err and "Traceback" not in err


def test_fetch_weights_from_a_mirror_that_drops_every_connection_ends_in_seconds(tmp_path):
    """The command line as a user runs it: non-zero exit, one sentence, no traceback, no minute of retries."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    server = Misbehaving("drop")
    env.update(HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_DOWNLOAD_TIMEOUT="2")
    start = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "flowmo", "fetch-weights", "official-lo"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.close()
    assert result.returncode != 0 and time.monotonic() - start < 60
    sentences = [line for line in result.stderr.splitlines() if line.startswith("flowmo fetch-weights:")]
    assert len(sentences) == 1 and server.url in sentences[0] and "Traceback" not in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------- pins
def test_the_pin_table_holds_commits_and_sha256_or_says_unpinned():
    for spec in FILES.values():
        assert spec.revision is None or (len(spec.revision) == 40 and int(spec.revision, 16) >= 0)
        assert spec.sha256 is None or (len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0)


def pin(monkeypatch, sha256: str) -> pretrained.PretrainedFile:
    spec = replace(FILES["official-lo"], revision="c" * 40, sha256=sha256)
    monkeypatch.setitem(FILES, "official-lo", spec)
    return spec


def test_a_pinned_release_is_fetched_at_its_commit_and_checked_against_its_sha256(online, monkeypatch):
    data = b"the released file" * 1000
    spec = pin(monkeypatch, hashlib.sha256(data).hexdigest())
    server = serve_as_hub(monkeypatch, "official-lo", data)
    try:
        path = pretrained.fetch("official-lo")
    finally:
        server.close()
    assert path.read_bytes() == data and f"/resolve/{'c' * 40}/" in spec.address
    assert server.requests[0] == ("HEAD", f"/ksarge/FlowMo/resolve/{'c' * 40}/flowmo_lo.pth")


def test_a_file_that_is_not_the_pinned_one_is_deleted_and_refused(online, monkeypatch):
    data = b"a file the Hub vouches for, but not the pinned one" * 1000
    pin(monkeypatch, hashlib.sha256(b"the released file").hexdigest())
    server = serve_as_hub(monkeypatch, "official-lo", data)  # announces the served file's own SHA-256
    try:
        with pytest.raises(WeightsHashError, match="deleted") as error:
            pretrained.fetch("official-lo")
    finally:
        server.close()
    assert hashlib.sha256(b"the released file").hexdigest() in str(error.value)
    assert pretrained.cached(FILES["official-lo"]) is None
    assert not [p for p in (online / "hf").rglob("*") if p.is_file() and p.stat().st_size == len(data)]


def test_the_authors_layout_is_read_with_weights_only(online, monkeypatch, official_fixture):
    """Their files hold two state dicts and an int: a loopback Hub serves a tiny one, read with weights_only=True."""
    state = official_fixture["official_state_dict"]
    data = torch_bytes({"model_ema_state_dict": state, "model_state_dict": state, "total_steps": 5})
    monkeypatch.setitem(RELEASES, "lo", ("official-lo", "tiny"))
    server = serve_as_hub(monkeypatch, "official-lo", data)
    try:
        tokenizer = from_pretrained("lo")
    finally:
        server.close()
    with torch.no_grad():
        code = tokenizer.encode(official_fixture["images"])
    assert (code - official_fixture["encoder_code"]).abs().max() <= 1e-4
