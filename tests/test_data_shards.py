"""Shard writer: counts + manifest, original bytes, resume, ILSVRC tar-of-tars and val tar sources, CLI."""

import json
import tarfile

import numpy as np
import pytest
import scipy.io

from data_helpers import jpeg_bytes, make_ilsvrc_train_tar, make_ilsvrc_val_tar, make_image_folder, tar_of
from flowmo.commands import main as flowmo_main
from flowmo.data import shards
from flowmo.data.shards import write_shards
from flowmo.data.sources import load_val_labels


def main(argv: list[str]) -> int:
    return flowmo_main(["shards", *argv])


class SimulatedCrash(Exception):
    """Stands in for a killed writer process."""


def shard_members(path):
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def all_members(out_dir, split):
    manifest = json.loads((out_dir / f"{split}.json").read_text())
    members = {}
    for shard in manifest["shards"]:
        members.update(shard_members(out_dir / shard["url"]))
    return manifest, members


def test_image_folder_counts_manifest_and_original_bytes(tmp_path):
    source = make_image_folder(tmp_path / "src")
    manifest = write_shards(source, tmp_path / "out", "val", shard_size=2, workers=1, progress=False)
    assert manifest["num_samples"] == 6 and manifest["num_shards"] == 4  # 8 image files in slices of 2
    assert [s["url"] for s in manifest["shards"]] == [f"val-{i:06d}.tar" for i in range(4)]
    assert sum(s["num_samples"] for s in manifest["shards"]) == 6
    assert manifest["classes"] == ["cat", "dog"]
    reasons = {entry["path"].split("/")[-1].split("@")[0]: entry["reason"] for entry in manifest["skipped"]}
    assert set(reasons) == {"broken.jpg", "fake.jpg", "notes.txt"}
    assert "truncated" in reasons["broken.jpg"] and "extension" in reasons["notes.txt"]
    _, members = all_members(tmp_path / "out", "val")
    assert members["cat/img_1.jpg"] == (source / "cat" / "img_1.jpg").read_bytes()  # never re-encoded
    assert members["dog/img_0.cls"] == b"1" and members["cat/img_2.cls"] == b"0"
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / ".val-parts").exists()


def test_resume_after_interruption_matches_a_clean_run(tmp_path, monkeypatch):
    source = make_image_folder(tmp_path / "src")
    out = tmp_path / "out"
    real_write = shards.write_one_shard
    calls, crashing = [], True

    def crash_on_second_shard(task):
        calls.append(task[0])
        if len(calls) == 2 and crashing:
            open(task[0] + ".tmp", "wb").write(b"half a shard")  # what a killed writer leaves behind
            raise SimulatedCrash
        return real_write(task)

    monkeypatch.setattr(shards, "write_one_shard", crash_on_second_shard)
    with pytest.raises(SimulatedCrash):
        write_shards(source, out, "train", shard_size=3, workers=1, progress=False)
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar"]  # readers see no partial shard
    assert not (out / "train.json").exists()

    calls.clear()
    crashing = False
    manifest = write_shards(source, out, "train", shard_size=3, workers=1, progress=False)
    assert len(calls) == 2  # shards 1 and 2 only: shard 0 was finished
    clean = write_shards(source, tmp_path / "clean", "train", shard_size=3, workers=1, progress=False)
    for shard in clean["shards"]:
        assert (out / shard["url"]).read_bytes() == (tmp_path / "clean" / shard["url"]).read_bytes()
    assert manifest["num_samples"] == clean["num_samples"] == 6 and manifest["skipped"] == clean["skipped"]
    assert not list(out.glob("*.tmp"))


def test_rerun_with_other_settings_is_refused(tmp_path):
    source = make_image_folder(tmp_path / "src")
    write_shards(source, tmp_path / "out", "val", shard_size=3, workers=1, progress=False)
    with pytest.raises(ValueError, match="different source or settings"):
        write_shards(source, tmp_path / "out", "val", shard_size=4, workers=1, progress=False)


def test_parallel_workers_write_the_same_shards(tmp_path):
    source = make_image_folder(tmp_path / "src")
    one = write_shards(source, tmp_path / "one", "train", shard_size=2, workers=1, progress=False)
    write_shards(source, tmp_path / "two", "train", shard_size=2, workers=2, progress=False)
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["url"]).read_bytes() == (tmp_path / "two" / shard["url"]).read_bytes()


def test_ilsvrc_train_tar_of_tars(tmp_path):
    images = make_ilsvrc_train_tar(tmp_path / "ILSVRC2012_img_train.tar")
    manifest = write_shards(
        tmp_path / "ILSVRC2012_img_train.tar", tmp_path / "out", "train", shard_size=4, workers=1, progress=False
    )
    assert manifest["classes"] == ["n01000001", "n02000002"]  # class index = sorted wnid order
    assert manifest["num_samples"] == 6 and [e["key"] for e in manifest["skipped"]] == ["n02000002_bad"]
    _, members = all_members(tmp_path / "out", "train")
    assert members["n02000002_1.jpg"] == images["n02000002_1.JPEG"]  # read straight from the nested tar
    assert members["n01000001_0.cls"] == b"0" and members["n02000002_2.cls"] == b"1"


def test_ilsvrc_val_tar_with_and_without_labels(tmp_path):
    make_ilsvrc_val_tar(tmp_path / "val.tar", count=4)
    unlabeled = write_shards(tmp_path / "val.tar", tmp_path / "a", "val", workers=1, progress=False)
    _, members = all_members(tmp_path / "a", "val")
    assert unlabeled["num_samples"] == 4 and members["ILSVRC2012_val_00000003.cls"] == b"-1"

    labels = tmp_path / "val.txt"
    labels.write_text("".join(f"ILSVRC2012_val_{n:08d}.JPEG {n % 2}\n" for n in range(1, 5)))
    write_shards(tmp_path / "val.tar", tmp_path / "b", "val", val_labels=labels, workers=1, progress=False)
    _, members = all_members(tmp_path / "b", "val")
    assert [members[f"ILSVRC2012_val_{n:08d}.cls"] for n in range(1, 5)] == [b"1", b"0", b"1", b"0"]


def test_flat_val_folder_takes_labels_from_a_file(tmp_path):
    (tmp_path / "val").mkdir()
    for n in (1, 2):
        (tmp_path / "val" / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(jpeg_bytes(n))
    (tmp_path / "labels.txt").write_text("ILSVRC2012_val_00000001.JPEG n09\nILSVRC2012_val_00000002.JPEG n01\n")
    write_shards(
        tmp_path / "val", tmp_path / "out", "val", val_labels=tmp_path / "labels.txt", workers=1, progress=False
    )
    _, members = all_members(tmp_path / "out", "val")
    assert members["ILSVRC2012_val_00000001.cls"] == b"1" and members["ILSVRC2012_val_00000002.cls"] == b"0"


def test_devkit_ground_truth_maps_ilsvrc_ids_to_sorted_wnids(tmp_path):
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    synsets = np.zeros((3, 1), dtype=[(name, "O") for name in fields])
    rows = [
        (1, "n02000002", "b", "", 0, np.array([]), 0, 1),
        (2, "n01000001", "a", "", 0, np.array([]), 0, 1),
        (3, "n00000009", "parent", "", 2, np.array([1, 2]), 1, 0),
    ]
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    (tmp_path / "devkit" / "data").mkdir(parents=True)
    scipy.io.savemat(tmp_path / "devkit" / "data" / "meta.mat", {"synsets": synsets})
    (tmp_path / "devkit" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n2\n")
    labels = load_val_labels(tmp_path / "devkit")
    # ILSVRC2012_ID 1 is n02000002, which is class 1 in sorted-wnid order.
    assert labels == {"ILSVRC2012_val_00000001": 1, "ILSVRC2012_val_00000002": 0, "ILSVRC2012_val_00000003": 0}
    (tmp_path / "devkit.tar.gz").write_bytes(b"")
    with tarfile.open(tmp_path / "devkit.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "devkit", arcname="ILSVRC2012_devkit_t12")
    assert load_val_labels(tmp_path / "devkit.tar.gz") == labels


def test_cli_writes_shards_and_reports_errors(tmp_path, capsys):
    source = make_image_folder(tmp_path / "src")
    argv = [
        "--source",
        str(source),
        "--out",
        str(tmp_path / "out"),
        "--split",
        "train",
        "--shard-size",
        "5",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "6 samples in 2 shards, 3 skipped" in capsys.readouterr().out
    assert main(["--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--split", "val"]) == 2
    assert "neither a directory" in capsys.readouterr().err


def test_tar_with_a_non_tar_member_type_is_indexed(tmp_path):
    (tmp_path / "flat.tar").write_bytes(tar_of({"readme.txt": b"hello"}))
    manifest = write_shards(tmp_path / "flat.tar", tmp_path / "out", "val", workers=1, progress=False)
    assert manifest["num_samples"] == 0 and manifest["skipped"][0]["reason"] == "not an image file extension"


def test_val_fraction_splits_one_folder_by_class_and_names_every_skipped_file(tmp_path, capsys):
    source = make_image_folder(tmp_path / "src", per_class=5)  # cat, dog: 5 good each, plus broken / fake / notes
    assert (
        main(["--source", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "0.2", "--no-progress"]) == 0
    )
    err = capsys.readouterr().err
    for name in ("broken.jpg", "fake.jpg", "notes.txt"):
        assert f"skipped {name}" in err or f"/{name}: " in err, err  # each named, with its reason
    train, train_members = all_members(tmp_path / "out", "train")
    val, val_members = all_members(tmp_path / "out", "val")
    val_keys = {name.rsplit(".", 1)[0] for name in val_members}
    assert {key.split("/")[0] for key in val_keys} == {"cat", "dog"}  # stratified: each class gives 1 of its 5-6
    assert not val_keys & {name.rsplit(".", 1)[0] for name in train_members}
    assert train["num_samples"] + val["num_samples"] == 10 and val["num_samples"] == 2
    again = shards.split_listing(shards.list_source(source), 0.2)  # deterministic
    assert {item.key for item in again["val"].items} == val_keys
    assert main(["--source", str(source), "--out", str(tmp_path / "none"), "--val-fraction", "0.01"]) == 2
    assert "leaves no validation image" in capsys.readouterr().err
