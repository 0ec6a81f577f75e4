"""Token shards: pretokenize -> detokenize reproduces reconstruct, resumes per shard, skips corrupt images, and
a generator refuses another tokenizer's tokens."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import jpeg_bytes, truncated_jpeg_bytes, write_shard
from flowmo.checkpoint import export_tokenizer, from_checkpoint
from flowmo.commands import main as flowmo_main
from flowmo.data.transforms import decode_rgb, val_transform
from flowmo.errors import UserError
from flowmo.generate import MaskGITModule
from flowmo.generate.data import TokenDataModule
from flowmo.generate.tokens import decode_ids, read_token_manifest
from flowmo.nn.tokenizer import FlowMoTokenizer


def pretokenize_main(argv: list[str]) -> int:
    return flowmo_main(["pretokenize", *argv])


def tokenizer_file(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return export_tokenizer(FlowMoTokenizer.from_preset("tiny").eval(), folder / f"tokenizer{seed}.pt")


def pretokenize(tokenizer: Path, shards: Path, out: Path, *extra: str) -> dict:
    assert (
        pretokenize_main(
            [
                "--tokenizer",
                str(tokenizer),
                "--shards",
                str(shards),
                "--out",
                str(out),
                "--no-progress",
                "--batch",
                "8",
                *extra,
            ]
        )
        == 0
    )
    return read_token_manifest(out / f"{extra[extra.index('--split') + 1] if '--split' in extra else 'train'}.json")


def token_rows(folder: Path, manifest: dict) -> dict[str, tuple[np.ndarray, int, str]]:
    rows = {}
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["url"]) as tar:
            members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".tokens.npy"):
                key = name[: -len(".tokens.npy")]
                rows[key] = (decode_ids(data), int(members[f"{key}.cls"]), members[f"{key}.src"].decode())
    return rows


def source_images(shards: Path) -> dict[str, bytes]:
    images = {}
    for path in sorted(shards.glob("val-*.tar")):
        with tarfile.open(path) as tar:
            images.update({m.name[:-4]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")})
    return images


def test_pretokenize_then_detokenize_equals_reconstruct_with_the_same_noise(tmp_path, sample_shards):
    tokenizer_path = tokenizer_file(tmp_path, seed=0)
    manifest = pretokenize(tokenizer_path, sample_shards / "val.json", tmp_path / "tokens", "--split", "val")
    assert manifest["tokens_dtype"] == "uint16" and manifest["crops"]["policy"] == "center"
    assert manifest["num_samples"] == json.loads((sample_shards / "val.json").read_text())["num_samples"]
    rows = token_rows(tmp_path / "tokens", manifest)
    images = source_images(sample_shards)
    keys = sorted(rows)[:4]
    tokenizer = from_checkpoint(tokenizer_path).eval()
    ids = torch.from_numpy(np.stack([rows[key][0] for key in keys]).astype(np.int64))
    crops = torch.stack([val_transform(decode_rgb(images[rows[key][2]]), 32) for key in keys])
    decoded = tokenizer.detokenize(ids, generator=torch.Generator().manual_seed(5), steps=2)
    reconstructed = tokenizer.reconstruct(crops, generator=torch.Generator().manual_seed(5), steps=2)
    assert torch.equal(decoded, reconstructed)


def test_pretokenize_resumes_per_shard_and_counts_corrupt_images(tmp_path):
    shards = tmp_path / "images"
    shards.mkdir()
    write_shard(
        shards / "train-000000.tar",
        {"a.jpg": jpeg_bytes(1), "a.cls": b"0", "bad.jpg": truncated_jpeg_bytes(), "bad.cls": b"1"},
    )
    write_shard(shards / "train-000001.tar", {"b.jpg": jpeg_bytes(2), "b.cls": b"1"})
    tokenizer_path = tokenizer_file(tmp_path, seed=0)
    out = tmp_path / "tokens"
    manifest = pretokenize(tokenizer_path, shards / "train-*.tar", out, "--crops", "3")
    assert manifest["num_samples"] == 6 and manifest["num_skipped"] == 1 and manifest["num_classes"] == 2
    assert manifest["skipped"][0]["key"] == "bad"
    assert sorted(token_rows(out, manifest)) == [f"{key}-crop{i}" for key in "ab" for i in range(3)]
    first = out / "train-000000.tar"
    written_at = first.stat().st_mtime_ns
    (out / "train-000001.tar").unlink()  # as if interrupted before the second shard was renamed
    again = pretokenize(tokenizer_path, shards / "train-*.tar", out, "--crops", "3")
    assert first.stat().st_mtime_ns == written_at  # the finished shard was skipped
    assert again["num_samples"] == 6
    assert pretokenize(tokenizer_path, shards / "train-*.tar", out, "--crops", "3") == again  # nothing left to do
    other = tokenizer_file(tmp_path, seed=1)  # finishing this folder with another tokenizer is refused
    assert (
        pretokenize_main(
            [
                "--tokenizer",
                str(other),
                "--shards",
                str(shards / "train-*.tar"),
                "--out",
                str(out),
                "--crops",
                "3",
                "--no-progress",
            ]
        )
        == 2
    )


def test_generator_refuses_token_shards_of_another_tokenizer(tmp_path, sample_shards):
    tokenizer_a, tokenizer_b = tokenizer_file(tmp_path, seed=0), tokenizer_file(tmp_path, seed=1)
    pretokenize(tokenizer_a, sample_shards / "val.json", tmp_path / "tokens", "--split", "val")
    data = TokenDataModule(train_tokens=str(tmp_path / "tokens" / "val.json"), batch_size=4)
    MaskGITModule(token_layout=data.token_layout, tokenizer=str(tokenizer_a)).setup("fit")  # the right one
    with pytest.raises(UserError, match="another tokenizer"):
        MaskGITModule(token_layout=data.token_layout, tokenizer=str(tokenizer_b)).setup("fit")


def test_token_datamodule_yields_int64_batches(tmp_path, sample_shards):
    pretokenize(tokenizer_file(tmp_path, seed=0), sample_shards / "val.json", tmp_path / "tokens", "--split", "val")
    manifest_path = str(tmp_path / "tokens" / "val.json")
    data = TokenDataModule(train_tokens=manifest_path, val_tokens=manifest_path, batch_size=4)
    batch = next(iter(data.train_dataloader()))
    assert batch["ids"].dtype == torch.int64 and batch["ids"].shape == (4, 32) and batch["cls"].shape == (4,)
    assert data.token_layout["tokens"] == 16 and data.token_layout["groups"] == 2
    rows = sum(len(b["key"]) for b in data.val_dataloader())
    assert rows == read_token_manifest(manifest_path)["num_samples"]


def test_token_streams_of_two_ranks_differ_and_split_validation(tmp_path, sample_shards):
    from itertools import islice

    from flowmo.generate.data import TokenStream

    pretokenize(tokenizer_file(tmp_path, seed=0), sample_shards / "train.json", tmp_path / "tokens")
    manifest = read_token_manifest(tmp_path / "tokens" / "train.json")
    urls = [str(tmp_path / "tokens" / shard["url"]) for shard in manifest["shards"]]
    first = [
        [row["key"] for row in islice(TokenStream(urls, train=True, rank=rank, world_size=2, shuffle_buffer=4), 6)]
        for rank in (0, 1)
    ]
    assert first[0] != first[1]  # ranks draw their own rows
    resumed = [
        row["key"]
        for row in islice(TokenStream(urls, train=True, rank=0, world_size=2, shuffle_buffer=4, start_step=100), 6)
    ]
    assert resumed != first[0]  # a resumed run does not replay its start
    halves = [{row["key"] for row in TokenStream(urls, train=False, rank=rank, world_size=2)} for rank in (0, 1)]
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == manifest["num_samples"]


@pytest.mark.slow
def test_pretokenize_splits_shards_over_two_ranks(tmp_path, sample_shards):
    """Lightning predict on 2 CPU ranks (ddp_spawn): every shard written once, the manifest counts them all."""
    from flowmo.generate.pretokenize import pretokenize as pretokenize_api

    tokenizer = tokenizer_file(tmp_path, seed=0)
    two = pretokenize_api(
        str(tokenizer),
        str(sample_shards / "val.json"),
        tmp_path / "two",
        split="val",
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        progress=False,
    )
    one = pretokenize(tokenizer, sample_shards / "val.json", tmp_path / "one", "--split", "val")
    assert two["num_samples"] == one["num_samples"] and two["num_shards"] == one["num_shards"]
    assert token_rows(tmp_path / "two", two).keys() == token_rows(tmp_path / "one", one).keys()
