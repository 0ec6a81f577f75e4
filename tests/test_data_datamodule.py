"""FlowMoDataModule and ShardStream: batches, transforms, val order, rank/worker split, corrupt samples, paths."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import jpeg_bytes, make_val_shards, truncated_jpeg_bytes, write_shard
from flowmo.data import FlowMoDataModule, resolve_shards
from flowmo.data.stream import ShardStream, SkipCounter
from flowmo.data.transforms import decode_rgb, resize_shorter_side, to_signed_tensor, train_transform, val_transform


def photo(width=50, height=30):
    return decode_rgb(jpeg_bytes(7, size=(width, height)))


def test_transforms_give_size_range():
    image = photo()
    crop = train_transform(image, 24, random.Random(0))
    assert crop.shape == (3, 24, 24) and crop.dtype == torch.float32
    assert crop.min() >= -1.0 and crop.max() <= 1.0 and crop.min() < -0.5 < 0.5 < crop.max()
    assert torch.equal(val_transform(image, 24), val_transform(image, 24))
    white = to_signed_tensor(Image.new("RGB", (4, 4), (255, 255, 255)))
    assert torch.equal(white, torch.ones(3, 4, 4))  # p / 127.5 - 1
    assert torch.equal(train_transform(image, 24, random.Random(3)), train_transform(image, 24, random.Random(3)))


ODD_SIZES = [(50, 30), (37, 23), (23, 37), (31, 31), (1000, 3), (24, 50)]  # (width, height)


def test_transforms_match_torchvision():
    T = pytest.importorskip("torchvision.transforms")
    image = photo()
    reference = T.Compose([T.Resize(24, antialias=True), T.CenterCrop(24)])(image)
    assert torch.equal(val_transform(image, 24), to_signed_tensor(reference))
    for width, height in ODD_SIZES:
        image = photo(width, height)
        resized = T.Resize(24, interpolation=T.InterpolationMode.BILINEAR, antialias=True)(image)
        assert np.array_equal(np.array(resize_shorter_side(image, 24)), np.array(resized)), (width, height)
        if min(width, height) >= 24:
            reference = T.Compose([T.Resize(24), T.CenterCrop(24)])(image)
            assert torch.equal(val_transform(image, 24), to_signed_tensor(reference))


def test_resize_keeps_the_shorter_side_rule_and_pil_bilinear_pixels():
    # shorter side -> size; longer side -> int(size * long / short), truncated (not rounded): 24 * 37 / 23 = 38.6
    expected_sizes = {
        (50, 30): (40, 24),
        (37, 23): (38, 24),
        (23, 37): (24, 38),
        (31, 31): (24, 24),
        (1000, 3): (8000, 24),
        (24, 50): (24, 50),
    }
    assert set(expected_sizes) == set(ODD_SIZES)
    for (width, height), expected_size in expected_sizes.items():
        image = photo(width, height)
        resized = resize_shorter_side(image, 24)
        assert resized.size == expected_size
        if expected_size != image.size:
            assert np.array_equal(np.array(resized), np.array(image.resize(expected_size, Image.Resampling.BILINEAR)))
    unchanged = photo(24, 50)
    assert np.array_equal(np.array(resize_shorter_side(unchanged, 24)), np.array(unchanged))  # not resampled


def test_val_transform_is_a_centre_crop_of_the_resized_image():
    image = photo(37, 23)  # resized to 25 x 16: the crop starts at round(9 / 2) = 4 (Python rounds half to even)
    resized = image.resize((25, 16), Image.Resampling.BILINEAR)
    assert torch.equal(val_transform(image, 16), to_signed_tensor(resized.crop((4, 0, 20, 16))))


def test_random_flip_is_off_by_default_and_configurable():
    image = photo(24, 24)  # the crop is the whole image, so only a flip can change it
    plain = {tuple(train_transform(image, 24, random.Random(s)).flatten()[:8].tolist()) for s in range(8)}
    flipped = {tuple(train_transform(image, 24, random.Random(s), True).flatten()[:8].tolist()) for s in range(8)}
    assert len(plain) == 1 and len(flipped) == 2


def test_val_loader_order_is_deterministic_and_complete(tmp_path):
    keys = make_val_shards(tmp_path, shards=3, per_shard=3)
    data = FlowMoDataModule(val_shards=str(tmp_path / "val-*.tar"), image_size=16, batch_size=4, num_workers=0)
    data.setup("validate")
    first = [key for batch in data.val_dataloader() for key in batch["key"]]
    second = [key for batch in data.val_dataloader() for key in batch["key"]]
    assert first == second and sorted(first) == sorted(keys)
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["cls"].dtype == torch.int64


def test_two_ranks_times_two_workers_cover_every_sample_once(tmp_path, monkeypatch):
    keys = make_val_shards(tmp_path, shards=5, per_shard=2)
    urls = resolve_shards(str(tmp_path / "val-{000000..000004}.tar"))
    seen = []
    for rank in range(2):
        for worker in range(2):  # webdataset's hook for the DataLoader worker slot
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            stream = ShardStream(urls, 16, train=False, rank=rank, world_size=2)
            seen += [sample["key"] for sample in stream]
    assert len(seen) == len(keys) and set(seen) == keys


def test_ranks_from_environment_and_real_workers(tmp_path, monkeypatch):
    keys = make_val_shards(tmp_path, shards=4, per_shard=2)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        data = FlowMoDataModule(
            val_shards=str(tmp_path / "val-*.tar"), image_size=16, batch_size=3, num_workers=2, persistent_workers=False
        )
        seen += [key for batch in data.val_dataloader() for key in batch["key"]]
    assert len(seen) == len(keys) and set(seen) == keys


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    write_shard(
        tmp_path / "val-000000.tar",
        {
            "good.jpg": jpeg_bytes(1),
            "good.cls": b"3",
            "cut.jpg": truncated_jpeg_bytes(),
            "cut.cls": b"1",
            "text.jpg": b"not an image",
            "text.cls": b"2",
            "nolabel.jpg": jpeg_bytes(2),
        },
    )
    data = FlowMoDataModule(val_shards=str(tmp_path / "val-000000.tar"), image_size=16, batch_size=8, num_workers=0)
    batches = list(data.val_dataloader())
    assert batches[0]["key"] == ["good", "nolabel"] and batches[0]["cls"].tolist() == [3, -1]
    assert data.skipped_samples == 2


def test_skip_count_is_shared_with_worker_processes(tmp_path):
    write_shard(tmp_path / "val-000000.tar", {"a.jpg": jpeg_bytes(1), "b.jpg": b"junk", "c.jpg": b"junk"})
    counter = SkipCounter()
    stream = ShardStream([str(tmp_path / "val-000000.tar")], 16, train=False, skip_counter=counter)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
    assert [sample["key"] for sample in loader] == ["a"] and counter.value == 2


def test_train_stream_is_infinite_shuffled_and_works_without_workers(tmp_path):
    keys = make_val_shards(tmp_path, shards=4, per_shard=3, size=(48, 32))
    data = FlowMoDataModule(
        train_shards=str(tmp_path / "val-*.tar"), image_size=16, batch_size=4, num_workers=0, shuffle_buffer=4, seed=1
    )
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(8)]  # 32 samples from a 12-sample set: resampled, never ends
    assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)
    assert all(-1 <= b["image"].min() and b["image"].max() <= 1 for b in batches)
    seen = [key for b in batches for key in b["key"]]
    assert set(seen) <= keys and len(set(seen)) > 6
    other_seed = FlowMoDataModule(
        train_shards=str(tmp_path / "val-*.tar"), image_size=16, batch_size=4, num_workers=0, shuffle_buffer=4, seed=2
    )
    assert next(iter(other_seed.train_dataloader()))["key"] != batches[0]["key"]  # the seed sets the stream


def test_missing_shards_raise_one_clear_sentence(tmp_path):
    data = FlowMoDataModule(train_shards=str(tmp_path / "nope" / "train.json"), val_shards=str(tmp_path / "v-*.tar"))
    with pytest.raises(FileNotFoundError, match="flowmo shards --source FOLDER .*IMAGENET=.*make sample-data"):
        data.setup("fit")
    with pytest.raises(FileNotFoundError, match="No shards found"):
        FlowMoDataModule(val_shards=str(tmp_path / "val-{000000..000003}.tar")).setup("validate")
    with pytest.raises(FileNotFoundError, match="data.train_shards is null"):
        FlowMoDataModule().setup("fit")


def test_shard_specs_manifest_braces_and_remote_urls(tmp_path):
    make_val_shards(tmp_path, shards=3, per_shard=1)
    local = [str(tmp_path / f"val-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(str(tmp_path / "val-{000000..000002}.tar")) == local
    assert resolve_shards(str(tmp_path / "val-*.tar")) == local
    remote = resolve_shards("pipe:aws s3 cp s3://bucket/train-{000000..000002}.tar -")
    assert remote == [f"pipe:aws s3 cp s3://bucket/train-{i:06d}.tar -" for i in range(3)]
    assert resolve_shards("https://host/x-{0..1}.tar") == ["https://host/x-0.tar", "https://host/x-1.tar"]


@pytest.mark.parametrize("name", ["sample", "imagenet"])
def test_data_configs_build_the_datamodule(name):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--data", type=FlowMoDataModule)
    config = parser.parse_path(Path(__file__).parents[1] / "configs" / "data" / f"{name}.yaml")
    data = parser.instantiate(config).data
    assert isinstance(data, FlowMoDataModule) and data.hparams.image_size in (64, 256)


def test_lightning_fit_with_the_infinite_stream_and_validation(tmp_path):
    import lightning as L

    class MeanModel(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.val_keys = []

        def training_step(self, batch, batch_idx):
            return (self.scale * batch["image"]).square().mean()

        def validation_step(self, batch, batch_idx):
            self.val_keys += batch["key"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    keys = make_val_shards(tmp_path / "shards", shards=2, per_shard=3)
    data = FlowMoDataModule(
        str(tmp_path / "shards" / "val-*.tar"),
        str(tmp_path / "shards" / "val-*.tar"),
        image_size=16,
        batch_size=2,
        num_workers=0,
    )
    model = MeanModel()
    trainer = L.Trainer(
        max_steps=4,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4 and sorted(model.val_keys) == sorted(keys)


def test_a_stream_where_nothing_decodes_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr("flowmo.data.stream.MAX_FAILURES_IN_A_ROW", 5)
    write_shard(tmp_path / "x-000000.tar", {f"k{i}.jpg": b"junk" for i in range(3)})
    stream = ShardStream([str(tmp_path / "x-000000.tar")], 16, train=True, shuffle_buffer=2)
    with pytest.raises(RuntimeError, match="in a row failed to decode"):
        next(iter(stream))


def test_train_streams_differ_across_ranks_and_resumed_steps(tmp_path):
    make_val_shards(tmp_path, shards=4, per_shard=3)
    urls = resolve_shards(str(tmp_path / "val-*.tar"))

    def first_keys(**position):
        stream = iter(ShardStream(urls, 8, train=True, shuffle_buffer=3, world_size=2, **position))
        return [next(stream)["key"] for _ in range(12)]

    assert first_keys(rank=0) == first_keys(rank=0)  # seeded: reproducible
    assert first_keys(rank=0) != first_keys(rank=1)  # method §6: ranks seeded differently
    assert first_keys(rank=0) != first_keys(rank=0, start_step=5000)  # a resumed run does not replay its start


def test_pipe_urls_are_read_like_cluster_storage(tmp_path):
    keys = make_val_shards(tmp_path, shards=2, per_shard=2)
    data = FlowMoDataModule(
        val_shards=f"pipe:cat {tmp_path}/val-{{000000..000001}}.tar", image_size=8, batch_size=4, num_workers=0
    )
    data.setup("validate")
    assert {key for batch in data.val_dataloader() for key in batch["key"]} == keys
