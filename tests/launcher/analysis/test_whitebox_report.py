"""``crate whitebox``: the per-layer report of an HF checkpoint (tiny random models, seconds; no training)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from crate_lm import CrateForCausalLM, CrateForImageClassification, CrateImageProcessor, config_from_preset
from crate_lm.whitebox import measure
from launcher.analysis.whitebox_report import combine, whitebox_report
from launcher.cli import main

REPO = Path(__file__).resolve().parents[3]
PNG = b"\x89PNG\r\n\x1a\n"
MAX_POSITIONS = 64  # crate-test's max_position_embeddings: the default block length (< 128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(gpt2_ranks_path):
    from launcher.models.tokenizers import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shakespeare_dir) -> Path:
    """About 6 KB of real text (some 1,700 GPT-2 tokens)."""
    source = min(Path(shakespeare_dir).glob("*.txt")).read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(source[20_000:26_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def crate_dir(tmp_path_factory, tokenizer) -> Path:
    """A random crate-test LM with GPT-2's tokenizer, saved as a run's hf/ export."""
    torch.manual_seed(0)
    config = config_from_preset(
        "crate-test",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("crate-run") / "hf"
    CrateForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(1)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=MAX_POSITIONS,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("gpt2-run") / "hf"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def stream(tokenizer, text_file: Path) -> list[int]:
    return tokenizer(text_file.read_text(encoding="utf-8"), verbose=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------- text


def test_report_files_and_rows_equal_measure_on_the_first_block(crate_dir, text_file, tokenizer):
    result = whitebox_report(str(crate_dir), str(text_file), samples=1)  # default --out: the run's whitebox/
    out = crate_dir.parent / "whitebox"
    for name in ("whitebox.json", "whitebox.md", "layers.png", "heads.png"):
        assert (out / name).is_file(), name
    assert (out / "layers.png").read_bytes()[:8] == PNG and (out / "heads.png").read_bytes()[:8] == PNG
    assert not (out / "attention.png").exists()

    saved = json.loads((out / "whitebox.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (saved["model_type"], saved["samples"], saved["max_length"], saved["tokens"]) == ("crate", 1, 64, 64)
    assert saved["blocks"] == [0] and saved["label"] == f"{crate_dir.parent.name}/hf"

    block = torch.tensor([stream(tokenizer, text_file)[:MAX_POSITIONS]])
    expected = measure(load(crate_dir), block)
    assert saved["layers"] == expected  # one batch: exactly measure()'s rows
    summary = saved["summary"]
    assert summary["rc_first"] == expected[0]["rc"] and summary["rc_last"] == expected[-1]["rc"]
    assert summary["rc_decreases"] == (expected[-1]["rc"] < expected[0]["rc"])
    assert summary["sparsity_increases"] == (expected[-1]["sparsity_l0"] < expected[0]["sparsity_l0"])

    markdown = (out / "whitebox.md").read_text()
    assert "| layer | R^c ± std |" in markdown and "![per-layer measures](layers.png)" in markdown
    assert "![per-head R^c](heads.png)" in markdown
    assert markdown.count("\n| 1 |") == 1 and "\n| 2 |" in markdown


def test_blocks_are_evenly_spaced_and_batches_combine_as_one(crate_dir, text_file, tokenizer, tmp_path):
    ids = stream(tokenizer, text_file)
    result = whitebox_report(
        str(crate_dir), str(text_file), out=str(tmp_path), samples=5, max_length=32, batch_size=2
    )  # batches of 2, 2, 1
    total = len(ids) // 32
    assert result["blocks"] == [i * total // 5 * 32 for i in range(5)] and result["blocks"][0] == 0
    assert result["stream_tokens"] == len(ids) and result["tokens"] == 5 * 32
    blocks = torch.tensor([ids[start : start + 32] for start in result["blocks"]])
    model = load(crate_dir)
    everything = measure(model, blocks)  # all five in one batch
    assert (
        whitebox_report(str(crate_dir), str(text_file), out=str(tmp_path), samples=5, max_length=32, batch_size=5)[
            "layers"
        ]
        == everything
    )
    for got, want in zip(result["layers"], everything):  # float32 forward passes of other batch shapes: ~1e-8
        assert got.keys() == want.keys() and got["layer"] == want["layer"]
        for key in ("rc", "rc_std", "rate", "delta_r", "sparsity_l0", "hoyer"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
        assert got["rc_per_head"] == pytest.approx(want["rc_per_head"], rel=1e-6)


def test_combine_pools_the_standard_deviation():
    rows = lambda values: [
        {
            "layer": 0,
            "rc": sum(values) / len(values),
            "rc_std": math.sqrt(sum((v - sum(values) / len(values)) ** 2 for v in values) / len(values)),
            "rc_per_head": [sum(values) / len(values)],
            "rate": 1.0,
            "delta_r": 0.0,
            "sparsity_l0": 0.5,
            "hoyer": 0.5,
        }
    ]
    combined = combine([(3, rows([1.0, 2.0, 6.0])), (1, rows([5.0]))])
    assert combined[0]["rc"] == pytest.approx(3.5) and combined[0]["rc_per_head"] == pytest.approx([3.5])
    assert combined[0]["rc_std"] == pytest.approx(math.sqrt(sum((v - 3.5) ** 2 for v in (1, 2, 6, 5)) / 4))


def test_compare_measures_both_on_the_same_blocks(crate_dir, gpt2_dir, text_file, tmp_path):
    result = whitebox_report(
        str(crate_dir), str(text_file), out=str(tmp_path), samples=3, batch_size=2, compare=[str(gpt2_dir)]
    )
    saved = json.loads((tmp_path / "whitebox.json").read_text())
    assert [other["model_type"] for other in saved["compare"]] == ["gpt2"]
    other = saved["compare"][0]
    assert other["blocks"] == saved["blocks"] and other["max_length"] == saved["max_length"] == MAX_POSITIONS
    assert len(other["layers"]) == len(saved["layers"]) == 2
    assert other["label"] != saved["label"]  # both folders are named hf: the run names tell them apart
    assert all(0 < row["sparsity_l0"] <= 1 for row in other["layers"])
    assert (tmp_path / "layers.png").read_bytes()[:8] == PNG
    markdown = (tmp_path / "whitebox.md").read_text()
    assert f"## Compared: {other['label']}" in markdown
    assert result["compare"][0]["layers"] == other["layers"]


def test_cli_prints_the_table(crate_dir, text_file, tmp_path, capsys):
    assert (
        main(
            [
                "whitebox",
                str(crate_dir),
                "--data",
                str(text_file),
                "--out",
                str(tmp_path),
                "--samples",
                "2",
                "--max-length",
                "16",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| layer | R^c ± std |" in printed and "2 blocks of 16 tokens" in printed
    assert str(tmp_path / "whitebox.json") in printed


def test_bad_checkpoint_is_a_one_line_cli_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "whitebox", str(tmp_path), "--data", "x.txt"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("crate whitebox: error:") and "no config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_other_bad_input_is_a_one_line_error(crate_dir, text_file, tmp_path, capsys):
    unsupported = tmp_path / "bert"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "bert"}))
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    cases = [
        ([str(unsupported), "--data", str(text_file)], "model type 'bert' is not supported"),
        ([str(crate_dir), "--data", str(short)], "too few for one block"),
        ([str(crate_dir), "--data", str(text_file), "--max-length", "65"], "exceeds"),
        ([str(crate_dir), "--data", str(tmp_path / "missing.txt")], "neither a file nor a built-in corpus"),
        ([str(crate_dir), "--data", str(text_file), "--compare", str(tmp_path / "nowhere")], "no config.json"),
    ]
    for argv, message in cases:
        assert main(["whitebox", *argv, "--out", str(tmp_path / "out")]) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("crate whitebox: error:") and message in error, (argv, error)


# ---------------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """40 Fashion-MNIST training images as DIR/CLASS/NNNNN.png (what `crate data export-images` writes)."""
    folder = tmp_path_factory.mktemp("images") / "fmnist"
    assert main(["data", "export-images", "fashion-mnist", str(folder), "--limit", "40"]) == 0
    return folder


def test_vision_report_with_attention_figure(image_folder, tmp_path):
    from PIL import Image

    from data_pipeline.image_sources import FolderCatalog
    from data_pipeline.image_spec import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    torch.manual_seed(0)
    config = config_from_preset("crate-vision-test", image_size=28, num_channels=1)
    checkpoint = tmp_path / "vision" / "hf"
    CrateForImageClassification(config).save_pretrained(checkpoint)
    processor = CrateImageProcessor(
        num_channels=1,
        size={"shortest_edge": 28},
        do_center_crop=True,
        crop_size={"height": 28, "width": 28},
        image_mean=list(FASHION_MNIST_MEAN),
        image_std=list(FASHION_MNIST_STD),
    )
    processor.save_pretrained(checkpoint)

    result = whitebox_report(str(checkpoint), str(image_folder), out=str(tmp_path / "out"), samples=6, batch_size=8)
    out = tmp_path / "out"
    for name in ("whitebox.json", "whitebox.md", "layers.png", "heads.png", "attention.png"):
        assert (out / name).read_bytes()[:8] == PNG or name.endswith((".json", ".md")), name
    assert result["model_type"] == "crate_vision" and result["image_size"] == [28, 28]
    assert result["samples"] == 6 and result["tokens"] == 6 * (1 + 7 * 7)  # patch 4: a 7 x 7 grid + CLS
    assert result["images"] == [i * 40 // 6 for i in range(6)]
    assert "![CLS attention, last layer](attention.png)" in (out / "whitebox.md").read_text()

    catalog = FolderCatalog(str(image_folder), "test")
    images = [Image.open(Path(catalog.root) / catalog.paths[i]).convert("RGB") for i in result["images"]]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(checkpoint)
    assert result["layers"] == measure(model, pixel_values)


def test_text_and_image_models_cannot_be_compared(crate_dir, image_folder, tmp_path, capsys):
    config = config_from_preset("crate-vision-test", image_size=28, num_channels=1)
    checkpoint = tmp_path / "vision"
    CrateForImageClassification(config).save_pretrained(checkpoint)
    CrateImageProcessor(num_channels=1).save_pretrained(checkpoint)
    assert (
        main(
            [
                "whitebox",
                str(checkpoint),
                "--data",
                str(image_folder),
                "--compare",
                str(crate_dir),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "cannot be measured on the same data" in capsys.readouterr().err
