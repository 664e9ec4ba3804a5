"""Image classification end to end: `crate pretrain` / `crate finetune` on real Fashion-MNIST with real DeepSpeed
(2 processes, gloo), CRATE and the ViT baseline through the same path, exports used through HF."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from launcher.metrics.logger import read_metrics

REPO = Path(__file__).resolve().parents[3]
CRATE = REPO / "configs" / "vision" / "crate-fmnist.yaml"
VIT = REPO / "configs" / "vision" / "vit-fmnist.yaml"
TOST = REPO / "configs" / "vision" / "tost-fmnist.yaml"
PROBE = REPO / "configs" / "vision" / "finetune-fmnist-linear-probe.yaml"
QUICK = ["train.log_every=10", "optimizer.warmup_steps=5", "data.shuffle_buffer=256"]

pytestmark = pytest.mark.slow


def crate(command: str, config: Path, output_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 600):
    args = [
        sys.executable,
        "-m",
        "launcher.cli",
        command,
        str(config),
        f"output_dir={output_dir}",
        *QUICK,
        *overrides,
        f"--nproc-per-node={nproc}",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def last_eval(output_dir: Path) -> dict:
    return read_metrics(output_dir, kind="eval")[-1]


def start_row(output_dir: Path) -> dict:
    return next(row for row in read_metrics(output_dir, kind="train") if row.get("event") == "start")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A small CRATE trained on Fashion-MNIST by 2 processes with ZeRO-2 (global batch 64, 100 steps)."""
    out = tmp_path_factory.mktemp("crate-fmnist") / "run"
    crate(
        "pretrain",
        CRATE,
        out,
        "train.max_steps=100",
        "train.micro_batch_size=32",
        "train.eval_every=50",
        "train.eval_batches=8",
        "train.whitebox_every=100",
        "train.save_every=50",
        nproc=2,
    )
    return out


@pytest.fixture(scope="module")
def coarse_folders(tmp_path_factory) -> Path:
    """A new label set over the same kind of images: Fashion-MNIST folded into 3 classes, as image folders."""
    root = tmp_path_factory.mktemp("fmnist-coarse")
    from data_pipeline.fashion_mnist import export_fashion_mnist_folder

    export_fashion_mnist_folder(root / "train", "train", limit=3000, coarse=True)
    export_fashion_mnist_folder(root / "test", "test", limit=1024, coarse=True)
    return root


def test_two_process_crate_learns_fashion_mnist_and_exports_an_hf_classifier(pretrained):
    start = start_row(pretrained)
    assert (start["world_size"], start["task"], start["model_type"]) == (2, "image-classification", "crate_vision")
    evals = read_metrics(pretrained, kind="eval")
    assert [row["step"] for row in evals] == [50, 100] and evals[-1]["images"] == 512
    assert evals[-1]["accuracy"] > 0.3, evals  # chance is 0.1
    train_rows = [row for row in read_metrics(pretrained, kind="train") if "loss" in row]
    assert train_rows[-1]["samples_per_s"] > 0 and train_rows[-1]["loss"] < train_rows[0]["loss"]
    layers = [row for row in read_metrics(pretrained, kind="whitebox") if row["step"] == 100]
    assert [row["layer"] for row in layers] == [0, 1, 2, 3]
    assert all(0 < row["sparsity_l0"] < 1 and np.isfinite(row["rc"]) for row in layers)
    figure = pretrained / "whitebox" / "attention-step000100.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from transformers import AutoModelForImageClassification, pipeline

    import crate_lm  # noqa: F401
    from data_pipeline.fashion_mnist import fashion_mnist
    from launcher.config.run import load_run_config
    from launcher.train.tasks import fixed_images, held_out_spec

    model = AutoModelForImageClassification.from_pretrained(pretrained / "hf").eval()
    assert type(model).__name__ == "CrateForImageClassification" and model.config.id2label[9] == "Ankle boot"
    # The export scores the run's own validation images exactly as the run's last evaluation did.
    spec = held_out_spec(load_run_config(pretrained / "config.yaml"))
    pixels, labels = fixed_images(spec, 512)
    with torch.no_grad():
        accuracy = (model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(evals[-1]["accuracy"], abs=1e-6)
    # And a plain HF pipeline on a raw test image agrees with the model on the transformed one.
    classifier = pipeline("image-classification", model=str(pretrained / "hf"), trust_remote_code=False)
    images, _ = fashion_mnist("test")
    from PIL import Image

    top = classifier(Image.fromarray(np.asarray(images[0])), top_k=1)[0]
    assert top["label"] in model.config.id2label.values() and 0 < top["score"] <= 1


def test_crate_export_rebuilds_the_image_model_from_the_checkpoint(pretrained, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "export",
            str(pretrained),
            "--step",
            "50",
            "--out",
            str(tmp_path / "hf50"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "hf50" / "preprocessor_config.json").is_file()
    final = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "export", str(pretrained), "--out", str(tmp_path / "hf100")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr[-2000:]
    at_save = load_file(pretrained / "hf" / "model.safetensors")
    rebuilt = load_file(tmp_path / "hf100" / "model.safetensors")
    assert at_save.keys() == rebuilt.keys() and all(torch.equal(at_save[k], rebuilt[k]) for k in at_save)
    assert not all(torch.equal(at_save[k], load_file(tmp_path / "hf50" / "model.safetensors")[k]) for k in at_save)


def test_linear_probe_transfers_to_a_new_label_set(pretrained, coarse_folders, tmp_path):
    out = tmp_path / "probe"
    crate(
        "finetune",
        PROBE,
        out,
        f"model.init_from={pretrained / 'hf'}",
        f"data.sources=[{coarse_folders / 'train'}]",
        f"eval_data.sources=[{coarse_folders / 'test'}]",
        "train.max_steps=60",
        "train.eval_every=60",
        "train.save_every=60",
    )
    start = start_row(out)
    hidden = 96
    assert (start["head"], start["trainable_params"]) == ("new", 3 * hidden + 3)
    result = last_eval(out)
    labels = [path.parent.name for path in (coarse_folders / "test").glob("*/*.png")]
    majority = max(labels.count(name) for name in set(labels)) / len(labels)
    assert result["accuracy"] > majority + 0.15, (result, majority)
    # The backbone is frozen: every weight but the head is the pretrained one, bit for bit.
    before, after = load_file(pretrained / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert {k for k in after if not torch.equal(after[k], before.get(k, torch.empty(0)))} == {
        "classifier.weight",
        "classifier.bias",
    }
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "hf").id2label == {
        0: "bottoms-and-dresses",
        1: "footwear-and-bags",
        2: "tops",
    }


def test_full_finetune_at_a_new_resolution_with_zero3_reports_corrupt_images(pretrained, coarse_folders, tmp_path):
    train = tmp_path / "train"  # a copy with every 20th image file corrupt
    shutil.copytree(coarse_folders / "train", train)
    for path in sorted(train.glob("*/*.png"))[::20]:
        path.write_bytes(b"not an image")
    out = tmp_path / "full"
    result = crate(
        "finetune",
        PROBE,
        out,
        f"model.init_from={pretrained / 'hf'}",
        "model.linear_probe=false",
        "data.image_size=35",
        "data.max_bad_fraction=0.2",
        f"data.sources=[{train}]",
        f"eval_data.sources=[{coarse_folders / 'test'}]",
        "train.max_steps=10",
        "train.eval_every=10",
        "train.save_every=10",
        "train.micro_batch_size=16",
        "train.eval_batches=4",
        "zero.stage=3",
        nproc=2,
    )
    assert start_row(out)["trainable_params"] is None and np.isfinite(last_eval(out)["loss"])
    # The ranks decoded some of the corrupt files (320 images read, 1 in 20 corrupt): the run counts and names them.
    bad = [row for row in read_metrics(out, kind="train") if "loss" in row][-1]["bad_records"]
    assert bad["total"] >= 2 and bad["by_reason"] == {"undecodable_image": bad["total"]}
    assert set(bad["by_source"]) <= {str(train / name) for name in ("bottoms-and-dresses", "footwear-and-bags", "tops")}
    assert len(bad["first"]) == 3 and all(first.endswith(".png: undecodable_image") for first in bad["first"])
    assert f"step 10 warning: {bad['total']} bad records skipped so far" in result.stderr
    assert bad["first"][0] in result.stderr and f"| bad {bad['total']}" in result.stderr
    weights = load_file(out / "hf" / "model.safetensors")
    assert weights["model.embeddings.position_embeddings"].shape == (1, 1 + 25, 96)
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import crate_lm  # noqa: F401  (registers the CRATE classes when this test runs alone)

    model = AutoModelForImageClassification.from_pretrained(out / "hf")
    assert model.config.image_size == 35 and model.config.num_labels == 3
    assert AutoImageProcessor.from_pretrained(out / "hf").crop_size == {"height": 35, "width": 35}


def test_vit_baseline_trains_and_transfers_through_the_same_path(coarse_folders, tmp_path):
    out = tmp_path / "vit"
    crate(
        "pretrain",
        VIT,
        out,
        "train.max_steps=20",
        "train.micro_batch_size=32",
        "train.eval_every=20",
        "train.eval_batches=4",
        "train.whitebox_every=20",
        "train.save_every=20",
    )
    start = start_row(out)
    assert start["model_type"] == "vit" and np.isfinite(last_eval(out)["accuracy"])
    assert len([row for row in read_metrics(out, kind="whitebox") if row["step"] == 20]) == 4
    assert (out / "whitebox" / "attention-step000020.png").is_file()
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out / "hf")
    assert type(model).__name__ == "ViTForImageClassification" and model.config.hidden_size == 96
    probe = tmp_path / "vit-probe"
    crate(
        "finetune",
        PROBE,
        probe,
        f"model.init_from={out / 'hf'}",
        f"data.sources=[{coarse_folders / 'train'}]",
        f"eval_data.sources=[{coarse_folders / 'test'}]",
        "train.max_steps=10",
        "train.eval_every=10",
        "train.save_every=10",
    )
    assert start_row(probe)["head"] == "new" and np.isfinite(last_eval(probe)["accuracy"])


def test_tost_vision_trains_exports_and_probes_with_its_batchnorm_frozen(coarse_folders, tmp_path):
    out = tmp_path / "tost"
    crate(
        "pretrain",
        TOST,
        out,
        "train.max_steps=20",
        "train.micro_batch_size=32",
        "train.eval_every=20",
        "train.eval_batches=4",
        "train.whitebox_every=20",
        "train.save_every=20",
    )
    start = start_row(out)
    assert start["model_type"] == "tost_vision" and np.isfinite(last_eval(out)["accuracy"])
    assert any(row.get("event") == "flops_counted" for row in read_metrics(out, kind="train"))  # no formula
    assert [row["layer"] for row in read_metrics(out, kind="whitebox") if row["step"] == 20] == [0, 1, 2, 3]
    assert (out / "whitebox" / "attention-step000020.png").is_file()
    from transformers import AutoModelForImageClassification

    import crate_lm  # noqa: F401  (registers tost_vision with the Auto classes)

    model = AutoModelForImageClassification.from_pretrained(out / "hf")
    assert type(model).__name__ == "ToSTForImageClassification" and model.config.hidden_size == 96
    probe = tmp_path / "tost-probe"
    crate(
        "finetune",
        PROBE,
        probe,
        f"model.init_from={out / 'hf'}",
        f"data.sources=[{coarse_folders / 'train'}]",
        f"eval_data.sources=[{coarse_folders / 'test'}]",
        "train.max_steps=10",
        "train.eval_every=10",
        "train.save_every=10",
    )
    assert start_row(probe)["head"] == "new" and np.isfinite(last_eval(probe)["accuracy"])
    before, after = load_file(out / "hf" / "model.safetensors"), load_file(probe / "hf" / "model.safetensors")
    statistics = [name for name in before if "running_" in name]
    assert statistics and all(torch.equal(before[name], after[name]) for name in statistics)


def test_resume_with_mixup_and_cutmix_equals_an_uninterrupted_run(tmp_path):
    """Augmentation, mixing and the image stream all resume exactly: stop at step 3, resume to 6."""
    common = [
        "train.micro_batch_size=8",
        "train.eval_every=0",
        "train.whitebox_every=0",
        "train.save_every=3",
        "train.label_smoothing=0.1",
        "train.mixup_alpha=0.8",
        "train.cutmix_alpha=1.0",
        "zero.stage=2",
    ]
    crate("pretrain", CRATE, tmp_path / "whole", "train.max_steps=6", *common)
    crate("pretrain", CRATE, tmp_path / "parts", "train.max_steps=3", *common)
    crate("pretrain", CRATE, tmp_path / "parts", "train.max_steps=6", *common)
    assert start_row(tmp_path / "parts")["resumed"] is False  # the first start row; the second says resumed
    resumed = [row for row in read_metrics(tmp_path / "parts", kind="train") if row.get("event") == "start"]
    assert [row["resumed"] for row in resumed][-1] is True
    whole = load_file(tmp_path / "whole" / "hf" / "model.safetensors")
    parts = load_file(tmp_path / "parts" / "hf" / "model.safetensors")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_finetune_requires_init_from(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "finetune", str(CRATE), f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert "model.init_from: required by crate finetune" in result.stderr and len(result.stderr.splitlines()) == 1
