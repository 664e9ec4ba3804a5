"""Streaming image pipeline: Fashion-MNIST, class folders, tar shards, HF imagefolder — sharding, exact resume,
mixtures, transforms and bad records, on real images."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from data_pipeline.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist, parse_idx
from data_pipeline.image_sources import BAD_REASONS
from data_pipeline.image_spec import parse_image_data
from data_pipeline.image_stream import (
    BadDataError,
    ImageLoader,
    ImageStream,
    build_image_plan,
    decode_image,
    eval_resize_shape,
    eval_transform,
    inspect_images,
    random_resized_crop_box,
    train_transform,
)
from data_pipeline.spec import DataSpecError
from tests import elastic_data as elastic
from tests.bad_data import NEVER_SPIN_SECONDS, undecodable_image_folder

FOLDER_IMAGES = 600  # test-split images 0..599 as PNG, one directory per class
TAR_IMAGES = range(600, 1200)  # test-split images 600..1199 in 4 tar files
TAR_FILES = 4


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_png(pixels: np.ndarray) -> bytes:
    """A PNG whose compressed pixel data is damaged: it opens, and fails when decoded."""
    data = bytearray(png_bytes(pixels))
    idat = data.index(b"IDAT") + 8
    data[idat : idat + 16] = bytes(16)
    return bytes(data)


def class_dir(label: int) -> str:
    return f"{label}-{FASHION_MNIST_CLASSES[label].replace('/', '-').replace(' ', '-').lower()}"


@pytest.fixture(scope="session")
def fmnist_test():
    images, labels = fashion_mnist("test")
    return np.asarray(images), np.asarray(labels)


@pytest.fixture(scope="session")
def image_folder(fmnist_test, tmp_path_factory) -> tuple[Path, dict]:
    """Real Fashion-MNIST images as class-per-folder PNGs, with corrupt files planted (and a stray text file)."""
    root = tmp_path_factory.mktemp("folder")
    images, labels = fmnist_test
    for label in range(10):
        (root / class_dir(label)).mkdir()
    for index in range(FOLDER_IMAGES):
        (root / class_dir(labels[index]) / f"img-{index:05d}.png").write_bytes(png_bytes(images[index]))
    planted = {
        f"{class_dir(1)}/bad-garbage.png": b"this is not an image",
        f"{class_dir(4)}/bad-truncated.png": png_bytes(images[0])[:100],
        f"{class_dir(4)}/bad-empty.jpg": b"",
        f"{class_dir(7)}/bad-damaged.png": corrupt_png(images[1]),
    }
    for rel, data in planted.items():
        (root / rel).write_bytes(data)
    (root / class_dir(2) / "notes.txt").write_text("not an image file: ignored")
    return root, planted


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def tar_shards(fmnist_test, tmp_path_factory) -> tuple[Path, dict, int]:
    """webdataset-style tar shards of real images (``KEY.png`` + ``KEY.cls``) with bad samples planted inside (never
    last in a file)."""
    root = tmp_path_factory.mktemp("tars")
    images, labels = fmnist_test
    good = [(f"train/s{i:06d}", {"png": png_bytes(images[i]), "cls": str(int(labels[i])).encode()}) for i in TAR_IMAGES]
    bad = {  # inserted before position (in file 0..3, at index)
        (0, 10): ("bad/no-label", {"png": png_bytes(images[2])}, "missing_label"),
        (1, 5): ("bad/out-of-range", {"png": png_bytes(images[3]), "cls": b"12"}, "label_out_of_range"),
        (1, 70): ("bad/negative", {"png": png_bytes(images[3]), "cls": b"-1"}, "label_out_of_range"),
        (2, 0): ("bad/not-a-number", {"png": png_bytes(images[4]), "cls": b"shirt"}, "invalid_label"),
        (2, 40): ("bad/garbage", {"jpg": b"\xff\xd8\xff garbage", "cls": b"3"}, "undecodable_image"),
        (3, 99): ("bad/label-only", {"cls": b"3"}, "missing_image"),
        (3, 100): ("bad/damaged", {"png": corrupt_png(images[5]), "cls": b"5"}, "undecodable_image"),
    }
    per_file = len(good) // TAR_FILES
    for number in range(TAR_FILES):
        samples = good[number * per_file : (number + 1) * per_file]
        for (file, at), (key, members, _) in sorted(bad.items(), reverse=True):
            if file == number:
                samples.insert(at, (key, members))
        write_tar(root / f"shard-{number:02d}.tar", samples)
    reasons = Counter(reason for _, _, reason in bad.values())
    return root, dict(reasons), len(good)


def spec(sources, **overrides):
    raw = {
        "sources": sources,
        "image_size": 28,
        "train": False,
        "shuffle_buffer": 0,
        "streams_per_rank": 1,
        "min_shards": 4,
    }
    raw.update(overrides)
    return parse_image_data(raw)


def identity(pixels, label) -> str:
    pixels = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    return hashlib.sha1(np.ascontiguousarray(pixels, dtype=np.float32).tobytes() + bytes([int(label)])).hexdigest()


def expected_identities(images, labels, image_spec) -> Counter:
    return Counter(
        identity(eval_transform(decode_image(image, 1), image_spec), label) for image, label in zip(images, labels)
    )


def epoch_samples(plan, stream: int) -> list[str]:
    """Identities of the samples stream ``stream`` yields in the first epoch of its (single) source."""
    logical = ImageStream(plan, stream)
    seen = []
    while True:
        pixels, label, _, epoch = logical.next_sample()
        if epoch > 0:
            return seen
        seen.append(identity(pixels, label))


# ------------------------------------------------------------------------------------------------ Fashion-MNIST


def test_idx_files_parse_into_the_full_balanced_dataset():
    train_images, train_labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    assert train_images.shape == (60_000, 28, 28) and test_images.shape == (10_000, 28, 28)
    assert train_images.dtype == np.uint8 and isinstance(train_images, np.memmap)
    assert np.bincount(train_labels).tolist() == [6_000] * 10
    assert np.bincount(test_labels).tolist() == [1_000] * 10
    assert 0.28 < train_images[:5000].mean() / 255 < 0.29  # the published mean, 0.2860
    from data_pipeline.fetch import fetch_fashion_mnist

    raw = gzip.decompress((fetch_fashion_mnist() / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert raw[:4] == b"\x00\x00\x08\x01" and np.array_equal(parse_idx(raw), test_labels)


def test_idx_parser_handles_types_and_rejects_bad_files():
    values = np.arange(-6, 6, dtype=">i2").reshape(3, 4)
    data = b"\x00\x00\x0b\x02" + np.array([3, 4], dtype=">u4").tobytes() + values.tobytes()
    parsed = parse_idx(data)
    assert parsed.shape == (3, 4) and parsed.tolist() == values.tolist()
    with pytest.raises(ValueError, match="bad magic"):
        parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="holds 2"):
        parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x06")


# ------------------------------------------------------------------------------------------------ sharding


def test_one_epoch_reads_every_image_exactly_once(fmnist_test):
    images, labels = fmnist_test
    image_spec = spec(["fashion-mnist"], split="test")
    samples = epoch_samples(build_image_plan(image_spec, 1), 0)
    assert len(samples) == 10_000 and Counter(samples) == expected_identities(images, labels, image_spec)


def _rank_main(rank, world, port, out_dir):
    # mp.spawn's children default to "spawn", so their DataLoader workers would re-import torch (seconds each on 2
    # cores); torchrun-launched ranks fork their workers, and so do these.
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plan = build_image_plan(spec(["fashion-mnist"], split="test", streams_per_rank=2), world)
        loader = ImageLoader(plan, rank=rank, micro_batch_size=50, num_workers=2)
        seen, steps, finished = [], 0, set()
        for batch in loader:
            if (batch["epoch"] > 0).any():
                finished.add(steps % 2)  # batch n of a rank comes from its logical stream n % streams_per_rank
            # A collective every step, as in training: unequal batch counts per rank would hang here.
            done = torch.tensor([int(len(finished) == 2)])
            dist.all_reduce(done)
            seen.extend(
                identity(pixels, label)
                for pixels, label, epoch in zip(batch["pixel_values"], batch["labels"], batch["epoch"])
                if epoch == 0
            )
            steps += 1
            if int(done) == world:
                break
        torch.save({"samples": seen, "steps": steps, "stats": loader.stats()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_two_workers_read_the_epoch_exactly_once(fmnist_test, tmp_path):
    port = random.randint(20000, 40000)
    mp.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert results[0]["steps"] == results[1]["steps"]
    union = Counter(sample for result in results for sample in result["samples"])
    single = Counter(epoch_samples(build_image_plan(spec(["fashion-mnist"], split="test"), 1), 0))
    assert sum(single.values()) == 10_000
    assert union == single
    assert all(result["stats"]["bad"] == {} for result in results)


def test_folder_and_tar_sources_hold_exactly_their_real_images(fmnist_test, image_folder, tar_shards):
    images, labels = fmnist_test
    folder, planted = image_folder
    tars, _, _ = tar_shards
    image_spec = spec([str(folder)], max_bad_fraction=1.0)
    from_folder = Counter(epoch_samples(build_image_plan(image_spec, 1), 0))
    assert from_folder == expected_identities(images[:FOLDER_IMAGES], labels[:FOLDER_IMAGES], image_spec)
    tar_spec = spec([{"tar": str(tars / "*.tar")}], num_classes=10, max_bad_fraction=1.0)
    plan = build_image_plan(tar_spec, 1)
    assert len(plan.shards[0]) == TAR_FILES
    wide = build_image_plan(spec([{"tar": str(tars)}], num_classes=10, max_bad_fraction=1.0, streams_per_rank=2), 2)
    union = Counter(sample for g in range(wide.num_streams) for sample in epoch_samples(wide, g))
    assert (
        union
        == Counter(epoch_samples(plan, 0))
        == expected_identities(
            images[TAR_IMAGES.start : TAR_IMAGES.stop], labels[TAR_IMAGES.start : TAR_IMAGES.stop], tar_spec
        )
    )


def test_hf_imagefolder_source_matches_the_folder(image_folder, tmp_path):
    pytest.importorskip("datasets")
    folder, _ = image_folder
    hf_spec = spec([{"hf": "imagefolder", "data_dir": str(folder)}], max_bad_fraction=1.0, min_shards=3)
    try:
        plan = build_image_plan(hf_spec, 1)
    except DataSpecError as error:
        pytest.skip(f"datasets cannot open a local imagefolder here: {error}")
    assert len(plan.shards[0]) >= 3 and plan.num_classes == 10  # one native shard read as 3 interleaved parts
    from_hf = Counter(epoch_samples(plan, 0))
    assert from_hf == Counter(epoch_samples(build_image_plan(spec([str(folder)], max_bad_fraction=1.0), 1), 0))
    # Resume from references into HF shards (re-read by example index).
    resume_spec = spec(
        [{"hf": "imagefolder", "data_dir": str(folder)}],
        max_bad_fraction=1.0,
        min_shards=3,
        shuffle_buffer=40,
        train=True,
        image_size=24,
    )
    _check_resume(build_image_plan(resume_spec, 1), workers=0, total=30, batch=8, seed=3)


# ------------------------------------------------------------------------------------------------ resume


def _check_resume(plan, workers: int, total: int, batch: int, seed: int, rank: int = 0) -> None:
    reference, reference_stats = [], None
    loader = ImageLoader(plan, rank=rank, micro_batch_size=batch, num_workers=workers)
    for item in loader:
        reference.append((item["pixel_values"], item["labels"], item["source"]))
        if len(reference) == total:
            reference_stats = loader.stats()
            break
    cut1, cut2 = sorted(random.Random(seed).sample(range(3, total - 3), 2))
    got, state = [], None
    for stop in (cut1, cut2, total):
        loader = ImageLoader(plan, rank=rank, micro_batch_size=batch, num_workers=workers, state=state)
        for item in loader:
            got.append((item["pixel_values"], item["labels"], item["source"]))
            if len(got) == stop:
                break
        state = loader.state_dict()
    assert len(got) == total
    for (a, la, sa), (b, lb, sb) in zip(reference, got):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(sa, sb)
    assert loader.stats() == reference_stats


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_twice_equals_the_uninterrupted_stream_with_augmentation(image_folder, tar_shards, workers):
    folder, _ = image_folder
    tars, _, _ = tar_shards
    image_spec = parse_image_data(
        {
            "sources": [{"builtin": "fashion-mnist", "weight": 2}, {"folder": str(folder)}, {"tar": str(tars)}],
            "image_size": 24,
            "train": True,
            "shuffle_buffer": 64,
            "streams_per_rank": 2,
            "min_shards": 4,
            "seed": 11,
            "num_classes": 10,
            "max_bad_fraction": 0.2,
        }
    )
    plan = build_image_plan(image_spec, 1)
    _check_resume(plan, workers, total=50, batch=16, seed=workers)


def test_the_second_rank_of_a_wider_world_resumes_exactly():
    plan = build_image_plan(
        spec(["fashion-mnist"], split="test", train=True, shuffle_buffer=32, streams_per_rank=2, image_size=24), 2
    )
    _check_resume(plan, workers=0, total=20, batch=8, seed=5, rank=1)


def test_the_global_order_is_the_same_at_any_world_size_and_resumes_across_them(image_folder):
    """As for text: augmented, shuffled images from a mixture come in the same global order at 1, 2 and 4 ranks, and
    resume exactly across world sizes."""
    folder, _ = image_folder
    image_spec = parse_image_data(
        {
            "sources": [{"builtin": "fashion-mnist", "split": "test", "weight": 2}, {"folder": str(folder)}],
            "image_size": 24,
            "train": True,
            "shuffle_buffer": 16,
            "num_streams": 4,
            "min_shards": 4,
            "seed": 5,
            "num_classes": 10,
            "max_bad_fraction": 1.0,
        }
    )

    def make(rank, world, state, workers=0):
        plan = build_image_plan(image_spec, world)
        return ImageLoader(plan, rank=rank, micro_batch_size=4, num_workers=workers, state=state)

    reference, _ = elastic.global_batches(lambda rank, world, state: make(rank, world, state, workers=2), 1, 16)
    for world in (2, 4):
        assert elastic.same_batches(elastic.global_batches(make, world, 16)[0], reference, "pixel_values")
    resumed = elastic.resumed_across(make, [(4, 4), (1, 6), (2, 6)])
    assert elastic.same_batches(resumed, reference, "pixel_values")
    assert elastic.same_batches(resumed, reference, "labels")
    elastic.check_refusals(make, DataSpecError)


def test_changed_source_and_transform_are_refused(image_folder, tmp_path):
    folder, _ = image_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    plan = build_image_plan(spec([str(copy)], streams_per_rank=2, max_bad_fraction=1.0), 1)
    loader = ImageLoader(plan, rank=0, micro_batch_size=4)
    next(iter(loader))
    state = loader.state_dict()
    ImageLoader(plan, rank=0, micro_batch_size=4, state=state)  # same plan: accepted
    with pytest.raises(DataSpecError, match="image_size was 28"):
        ImageLoader(
            build_image_plan(spec([str(copy)], streams_per_rank=2, max_bad_fraction=1.0, image_size=32), 1),
            rank=0,
            micro_batch_size=4,
            state=state,
        )
    shutil.copy(sorted((copy / class_dir(3)).glob("img-*.png"))[0], copy / class_dir(3) / "img-99999.png")
    with pytest.raises(DataSpecError, match="fingerprint") as error:
        ImageLoader(
            build_image_plan(spec([str(copy)], streams_per_rank=2, max_bad_fraction=1.0), 1),
            rank=0,
            micro_batch_size=4,
            state=state,
        )
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ mixtures


def test_mixture_honours_weights(image_folder):
    folder, _ = image_folder
    image_spec = spec([{"builtin": "fashion-mnist", "weight": 3}, {"folder": str(folder)}], max_bad_fraction=1.0)
    stream = ImageStream(build_image_plan(image_spec, 1), 0)
    sources = Counter(stream.next_record()[0][0] for _ in range(4000))
    assert abs(sources[0] / 4000 - 0.75) < 0.025


# ------------------------------------------------------------------------------------------------ bad records


def test_bad_tar_samples_are_skipped_and_counted_exactly(tar_shards):
    tars, reasons, good = tar_shards
    plan = build_image_plan(spec([{"tar": str(tars)}], num_classes=10, max_bad_fraction=0.1), 1)
    stream = ImageStream(plan, 0)
    for _ in range(good):  # every tar file ends with a good sample, so the epoch's bad ones are all passed
        assert stream.next_sample()[3] == 0
    stats = stream.state["stats"]
    assert stats["images"] == good
    assert stats["bad"] == reasons and set(reasons) <= set(BAD_REASONS)
    first = stats["bad_files"][str(tars / "shard-03.tar")]["first"]
    assert len(first) == 2 and first[0].startswith("sample 'bad/label-only' at byte ")
    assert first[0].endswith(": missing_image") and first[1].endswith(": undecodable_image")


def test_bad_folder_images_are_counted_per_class_directory(image_folder):
    folder, planted = image_folder
    plan = build_image_plan(spec([str(folder)], max_bad_fraction=0.1), 1)
    stream = ImageStream(plan, 0)
    while stream.state["stats"]["images"] < 2 * FOLDER_IMAGES:  # two epochs: every planted file passed once or twice
        stream.next_sample()
    stats = stream.state["stats"]
    assert set(stats["bad"]) == {"undecodable_image"} and len(planted) <= stats["bad"]["undecodable_image"] <= 2 * len(
        planted
    )
    bad_dirs = {str(folder / rel.split("/")[0]) for rel in planted}
    assert set(stats["bad_files"]) == bad_dirs
    assert f"{class_dir(4)}/bad-empty.jpg: undecodable_image" in stats["bad_files"][str(folder / class_dir(4))]["first"]
    # Exact per epoch: the catalog's records of all shards, decoded, give exactly the planted files.
    catalog, failed = plan.catalogs[0], []
    for shard in plan.shards[0]:
        for record in catalog.read(shard, None, np.arange(shard.size), plan.num_classes):
            try:
                decode_image(record.payload, 1)
            except Exception:
                failed.append(record.location)
    assert sorted(failed) == sorted(planted)


def test_a_damaged_tar_file_costs_one_corrupt_record(fmnist_test, tmp_path):
    images, labels = fmnist_test
    write_tar(
        tmp_path / "whole.tar",
        [(f"s{i:03d}", {"png": png_bytes(images[i]), "cls": str(int(labels[i])).encode()}) for i in range(20)],
    )
    data = (tmp_path / "whole.tar").read_bytes()
    for name, damaged in (
        ("truncated.tar", data[: len(data) // 2]),  # inside a member's data or header
        ("overwritten.tar", data[:5000] + b"Z" * 600 + data[5600:]),
    ):
        (tmp_path / name).write_bytes(damaged)
        plan = build_image_plan(spec([{"tar": str(tmp_path / name)}], num_classes=10, min_shards=1), 1)
        records = list(plan.catalogs[0].read(plan.shards[0][0], None, None, 10))
        assert [r.bad for r in records[:-1]] == [None] * (len(records) - 1) and records[-1].bad == "corrupt_tar"
        assert 1 < len(records) < 20 and records[-1].next_position == len(damaged)
        resumed = list(plan.catalogs[0].read(plan.shards[0][0], records[1].next_position, None, 10))
        assert [(r.locator, r.bad) for r in resumed] == [(r.locator, r.bad) for r in records[2:]]


def test_too_many_bad_records_stop_the_run(tar_shards, tmp_path):
    tars, _, _ = tar_shards
    image_spec = spec([{"tar": str(tars)}], num_classes=10, max_bad_fraction=0.005)
    with pytest.raises(BadDataError, match=r"max_bad_fraction=0.005 exceeded: \d+ bad of \d+ records"):
        for _ in ImageLoader(build_image_plan(image_spec, 1), rank=0, micro_batch_size=16):
            pass
    write_tar(tmp_path / "labels-only.tar", [(f"s{i}", {"cls": b"1"}) for i in range(5)])
    image_spec = spec([{"tar": str(tmp_path / "labels-only.tar")}], num_classes=10, max_bad_fraction=1.0, min_shards=1)
    with pytest.raises(BadDataError, match=r"stream 0 read all its 1 shards and found no usable sample"):
        next(iter(ImageLoader(build_image_plan(image_spec, 1), rank=0, micro_batch_size=2)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_bad_fraction", [1.0, 0.01], ids=["bad-fraction-1", "default"])
def test_a_folder_of_undecodable_images_is_one_line_in_bounded_time(max_bad_fraction, tmp_path):
    """Images are decoded after the shuffle buffer; until one of a source decodes they are also decoded when read,
    so a source with none stops after a whole epoch instead of looping on (with max_bad_fraction 1 for ever)."""
    folder = undecodable_image_folder(tmp_path / "folder")
    plan = build_image_plan(spec([str(folder)], shuffle_buffer=64, max_bad_fraction=max_bad_fraction), 1)
    started = time.monotonic()
    for workers in (0, 1):
        with pytest.raises(BadDataError) as error:
            next(iter(ImageLoader(plan, rank=0, micro_batch_size=2, num_workers=workers)))
        assert str(error.value).startswith(
            f"data.sources[0]: '{folder}': stream 0 read all its 4 shards and found no usable sample (6 bad records "
            f"{{'undecodable_image': 6}}; worst file {folder}/"
        ), str(error.value)
    with pytest.raises(BadDataError, match="found no usable sample"):
        inspect_images(plan.spec, seconds=0.1)
    assert time.monotonic() - started < NEVER_SPIN_SECONDS


# ------------------------------------------------------------------------------------------------ transforms


def test_eval_transform_is_deterministic_and_the_identity_at_native_size(fmnist_test):
    images, _ = fmnist_test
    image_spec = spec(["fashion-mnist"])
    image = decode_image(images[7], 1)
    out = eval_transform(image, image_spec)
    assert np.array_equal(out, eval_transform(image, image_spec))
    assert np.allclose(out[0], (images[7] / 255.0 - 0.2860) / 0.3530, atol=1e-5)  # no resize at 28 -> 28
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    rgb_spec = parse_image_data({"sources": [{"folder": "x"}], "image_size": 224, "train": False})
    assert eval_resize_shape(400, 300, 224) == (341, 256)  # shorter side 224 / 0.875 = 256
    assert eval_resize_shape(20, 40, 28) == (28, 56)  # a small image: no margin, never cropped beyond its ratio
    assert eval_transform(big, rgb_spec).shape == (3, 224, 224)
    assert np.array_equal(eval_transform(big, rgb_spec), eval_transform(big, rgb_spec))


def test_train_transform_shape_normalisation_and_determinism():
    images, _ = fashion_mnist("train")
    rng = np.random.default_rng(0)
    picks = rng.choice(len(images), 3000, replace=False)
    plain = spec(["fashion-mnist"], train=True, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0])  # crop = whole image
    batch = np.stack([train_transform(decode_image(images[i], 1), plain, 0, n) for n, i in enumerate(picks)])
    assert batch.shape == (3000, 1, 28, 28) and batch.dtype == np.float32
    assert abs(batch.mean()) < 0.02 and abs(batch.std() - 1) < 0.02  # Fashion-MNIST's own mean / std
    augmented = spec(["fashion-mnist"], train=True, image_size=32)
    image = decode_image(images[0], 1)
    outs = [train_transform(image, augmented, 0, n) for n in range(20)]
    assert all(out.shape == (1, 32, 32) for out in outs)
    assert np.array_equal(outs[3], train_transform(image, augmented, 0, 3))  # same (seed, stream, index): same crop
    assert len({out.tobytes() for out in outs}) == 20  # different indices: different crops / flips
    rgb = parse_image_data({"sources": ["fashion-mnist"], "channels": 3, "image_size": 16})
    assert rgb.mean == (0.485, 0.456, 0.406) and train_transform(decode_image(images[0], 3), rgb, 0, 0).shape == (
        3,
        16,
        16,
    )


def test_random_resized_crop_box_follows_torchvision():
    rng = np.random.default_rng(1)
    for _ in range(500):
        draws = rng.random(41)
        left, top, w, h = random_resized_crop_box(40, 30, (0.08, 1.0), (3 / 4, 4 / 3), lambda k, d=draws: d[k])
        assert left >= 0 and left + w <= 40 and top >= 0 and top + h <= 30 and w > 0 and h > 0
    assert random_resized_crop_box(100, 10, (0.9, 1.0), (3 / 4, 4 / 3), lambda k: 0.99) == (43, 0, 13, 10)  # fallback


def test_rgb_jpeg_and_palette_images_of_mixed_sizes(fmnist_test, tmp_path):
    images, labels = fmnist_test
    for index in range(40):
        grey = Image.fromarray(images[index])
        tinted = Image.merge("RGB", (grey, grey.point(lambda v: v // 2), grey.point(lambda v: 255 - v)))
        size = (28 + 13 * (index % 5), 28 + 7 * (index % 3))
        target = tmp_path / "rgb" / class_dir(labels[index])
        target.mkdir(parents=True, exist_ok=True)
        if index % 4 == 0:
            tinted.resize(size).convert("P").save(target / f"{index}.png")  # palette
        elif index % 4 == 1:
            tinted.resize(size).convert("RGBA").save(target / f"{index}.PNG")  # alpha, upper-case suffix
        else:
            tinted.resize(size).save(target / f"{index}.jpeg", quality=90)
    for train in (True, False):
        image_spec = spec([str(tmp_path / "rgb")], channels=3, image_size=32, train=train, min_shards=2)
        batch = next(iter(ImageLoader(build_image_plan(image_spec, 1), rank=0, micro_batch_size=40)))
        assert batch["pixel_values"].shape == (40, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert sorted(batch["labels"].tolist()) == sorted(labels[:40].tolist())


# ------------------------------------------------------------------------------------------------ spec errors


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"sources": [{"builtin": "mnist"}]}, "data.sources[0].builtin: unknown built-in image source 'mnist'"),
        ({"sources": []}, "data.sources: must be a non-empty list"),
        ({"sources": [{"folder": "/no/such/dir"}]}, "data.sources[0].folder: '/no/such/dir' is not a directory"),
        ({"sources": [{"tar": "/no/such/*.tar"}]}, "data.sources[0].tar: no files match '/no/such/*.tar'"),
        ({"sources": [{"folder": "x", "tar": "y"}]}, "data.sources[0]: give exactly one of builtin, folder, tar or hf"),
        ({"sources": ["fashion-mnist"], "channels": 2}, "data.channels: must be 1 or 3"),
        ({"sources": ["fashion-mnist"], "mean": [0.5, 0.5]}, "data.mean: must be a list of 1 numbers"),
        ({"sources": ["fashion-mnist"], "crop_scale": [0.5, 0.1]}, "data.crop_scale: need 0 < min <= max <= 1"),
        ({"sources": ["fashion-mnist"], "split": "validation"}, "data.split: 'validation' is not one of"),
        ({"sources": ["fashion-mnist"], "image_size": 0}, "data.image_size: must be >= 1"),
        ({"sources": ["fashion-mnist"], "colour": 1}, "data.colour: unknown key"),
        ({"sources": [{"folder": "x", "image_field": "img"}]}, "data.sources[0].image_field: only applies to hf"),
        ({"sources": ["fashion-mnist"], "train": "yes"}, "data.train: must be true or false"),
    ],
)
def test_bad_specs_fail_at_start_with_one_line(raw, message):
    with pytest.raises(DataSpecError) as error:
        build_image_plan(parse_image_data(raw), 1)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_too_few_shards_and_unknown_class_count_fail_at_start(tar_shards):
    tars, _, _ = tar_shards
    with pytest.raises(DataSpecError, match="has 4 shards but the run has 8 logical streams"):
        build_image_plan(spec([{"tar": str(tars)}], num_classes=10, streams_per_rank=2), 4)
    with pytest.raises(DataSpecError, match=r"data.num_classes: required, since data.sources\[0\]"):
        build_image_plan(spec([{"tar": str(tars)}]), 1)


def test_defaults_follow_the_split_and_inspect_reports(image_folder):
    from data_pipeline.image_stream import is_image_data

    folder, _ = image_folder
    assert is_image_data({"sources": ["fashion-mnist"]}) and is_image_data({"sources": [{"tar": "x"}]})
    assert not is_image_data({"sources": [{"path": "corpus"}], "seq_len": 64})
    assert parse_image_data({"sources": ["fashion-mnist"]}).train is True
    evaluation = parse_image_data({"sources": ["fashion-mnist"], "split": "test", "image_size": 28})
    assert evaluation.train is False and evaluation.channels == 1 and evaluation.sources[0].split == "test"
    assert parse_image_data({"sources": [str(folder)]}).channels == 3
    report = inspect_images(spec(["fashion-mnist", str(folder)], max_bad_fraction=1.0), samples=2, seconds=0.2)
    assert "fashion-mnist:test" not in report and "fashion-mnist:train (builtin" in report
    assert "sample 1: label" in report and "images/s" in report
