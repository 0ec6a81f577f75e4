"""The shard index and the indexed training sampler: what makes a resumed run see the same images (issue 8)."""

import shutil
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_helpers import jpeg_bytes, make_image_folder, truncated_jpeg_bytes, write_shard
from flowmo.data import FlowMoDataModule, write_shards
from flowmo.data.index import BAD_LABEL, build_index, load_index, sidecar_path
from flowmo.data.indexed import IndexedBatches
from flowmo.data.stream import SkipCounter
from flowmo.errors import UserError

INDEX_FIELDS = ("shard", "offset", "size", "label", "key", "stamps")


def same_index(a, b) -> bool:
    return a.shards == b.shards and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in INDEX_FIELDS)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["cls"], y["cls"])
        for x, y in zip(a, b)
    )


def take(batches, count: int, workers: int = 0) -> list[dict]:
    """The first `count` batches of a DataLoader, or of a DataLoader over an IndexedBatches."""
    if not isinstance(batches, torch.utils.data.DataLoader):
        batches = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers)
    loader = iter(batches)
    return [next(loader) for _ in range(count)]


def test_the_writer_indexes_its_shards_like_a_walk_of_the_tar_headers(tmp_path):
    make_image_folder(tmp_path / "src", per_class=4)
    manifest = write_shards(tmp_path / "src", tmp_path / "out", "train", shard_size=3, workers=2, progress=False)
    shards = [str(tmp_path / "out" / shard["url"]) for shard in manifest["shards"]]
    written = load_index(sidecar_path(tmp_path / "out" / "train.json"), shards)
    assert written is not None and same_index(written, build_index(shards)) and len(written) == 8
    for i in range(len(written)):  # every entry points at its image's bytes and carries its label
        with tarfile.open(shards[written.shard[i]]) as tar:
            key = written.key[i].decode()
            image = tar.extractfile(f"{key}.jpg").read()
            assert tar.extractfile(f"{key}.cls").read() == str(written.label[i]).encode()
        with open(shards[written.shard[i]], "rb") as handle:
            handle.seek(written.offset[i])
            assert handle.read(written.size[i]) == image


def test_a_missing_or_stale_index_is_rebuilt_and_cached(sample_shards, tmp_path, monkeypatch, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    sidecar = shards / "train.index.npz"
    original = sidecar.read_bytes()
    sidecar.unlink()
    data = FlowMoDataModule(str(shards / "train.json"), image_size=16, batch_size=2, num_workers=0)
    assert len(data.train_index()) == 72 and sidecar.read_bytes() == original  # rebuilt, the same, cached
    assert "flowmo: indexed 72 samples in 9 shards" in capsys.readouterr().err

    first = shards / "train-000000.tar"
    with tarfile.open(first) as tar:  # the shard rewritten with one sample fewer: its size and mtime change
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    write_shard(first, dict(list(members.items())[2:]))
    assert len(FlowMoDataModule(str(shards / "train.json")).train_index()) == 71
    assert "indexed 71 samples" in capsys.readouterr().err

    def read_only(index, path):
        raise PermissionError(f"Permission denied: {path}")

    monkeypatch.setattr("flowmo.data.index.save_index", read_only)
    sidecar.unlink()
    assert len(FlowMoDataModule(str(shards / "train.json")).train_index()) == 71
    assert "it is kept in memory" in capsys.readouterr().err and not sidecar.exists()


def test_micro_batches_do_not_depend_on_the_start_point_or_the_worker_count(sample_shards):
    data = FlowMoDataModule(str(sample_shards / "train.json"), image_size=16, batch_size=3, num_workers=0)
    index = data.train_index()

    def batches(start: int = 0, rank: int = 0, seed: int = 0) -> IndexedBatches:
        return IndexedBatches(index, 16, 3, seed=seed, start_batch=start, rank=rank)

    reference = take(batches(), 6)
    assert same_batches(take(batches(), 6, workers=1), reference)
    assert same_batches(take(batches(), 6, workers=2), reference)  # round-robin over workers, in order
    assert same_batches(take(batches(start=3), 3, workers=2), reference[3:])
    assert not same_batches(take(batches(rank=1), 1), reference[:1])  # method §6: ranks seeded differently
    assert not same_batches(take(batches(seed=1), 1), reference[:1])
    # the DataModule starts at the trainer's step x accumulation: step 2 of 2 micro-batches = micro-batch 4
    data.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=2, accumulate_grad_batches=2)
    assert same_batches(take(data.train_dataloader(), 2), reference[4:6])


def test_a_corrupt_sample_is_skipped_counted_and_replaced_the_same_way_every_time(tmp_path):
    write_shard(
        tmp_path / "train-000000.tar",
        {
            **{
                name: data for i in range(3) for name, data in ((f"good{i}.jpg", jpeg_bytes(i)), (f"good{i}.cls", b"1"))
            },
            "cut.jpg": truncated_jpeg_bytes(),
            "cut.cls": b"0",
            "text.jpg": b"not an image",
            "text.cls": b"0",
            "label.jpg": jpeg_bytes(9),
            "label.cls": b"cat",
            "nolabel.jpg": jpeg_bytes(10),
        },
    )
    index = build_index([str(tmp_path / "train-000000.tar")])
    assert len(index) == 7 and index.label.tolist().count(BAD_LABEL) == 1

    def draw(workers: int) -> tuple[list[dict], int]:
        counter = SkipCounter()
        return take(IndexedBatches(index, 16, 4, skip_counter=counter), 8, workers), counter.value

    batches, skipped = draw(workers=0)
    keys = [key for batch in batches for key in batch["key"]]
    assert len(keys) == 32 and set(keys) == {"good0", "good1", "good2", "nolabel"}  # replaced by other draws
    assert skipped > 0 and [batch["cls"].tolist().count(-1) for batch in batches] == [
        batch["key"].count("nolabel") for batch in batches
    ]
    again, skipped_again = draw(workers=0)
    assert same_batches(again, batches) and skipped_again == skipped  # the same redraws, the same count
    assert same_batches(draw(workers=2)[0], batches)  # (workers read ahead, so they have counted more by now)


def test_the_sampler_is_indexed_for_local_shards_and_streams_remote_ones(sample_shards, capsys):
    local = str(sample_shards / "train.json")
    remote = f"pipe:cat {sample_shards}/train-{{000000..000008}}.tar"
    assert FlowMoDataModule(local).resolved_train_sampler() == "indexed"
    assert FlowMoDataModule(local, train_sampler="stream").resolved_train_sampler() == "stream"
    streamed = FlowMoDataModule(remote, image_size=16, batch_size=2, num_workers=0, shuffle_buffer=4)
    assert streamed.resolved_train_sampler() == "stream"
    for _ in range(2):
        assert next(iter(streamed.train_dataloader()))["image"].shape == (2, 3, 16, 16)
    assert capsys.readouterr().err.count("does not replay the uninterrupted run's images bit for bit") == 1
    with pytest.raises(UserError, match="train_sampler indexed needs local shard files"):
        FlowMoDataModule(remote, train_sampler="indexed").resolved_train_sampler()
    with pytest.raises(UserError, match="must be one of auto, indexed, stream"):
        FlowMoDataModule(local, train_sampler="random")
