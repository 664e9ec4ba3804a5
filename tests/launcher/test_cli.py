"""The ``crate`` command line, run as users run it (a subprocess of the installed console script's module)."""

import subprocess
import sys

import pytest


def crate(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_subcommands():
    result = crate("--help")
    assert result.returncode == 0
    for command in ("pretrain", "models", "tokenizer", "data"):
        assert command in result.stdout


def test_models_lists_presets_with_published_counts():
    result = crate("models")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("causal-crate-base "))
    assert "59.91M" in line and "59.9M" in line


@pytest.mark.parametrize(
    "args, field",
    [
        (("pretrain", "configs/lm/crate-tiny.yaml", "model.preset=no-such-preset"), "no-such-preset"),
        (("pretrain", "configs/lm/crate-tiny.yaml", "data.seq_len=4096"), "data.seq_len"),
        (("pretrain", "configs/lm/crate-tiny.yaml", "--nproc-per-node", "0"), "--nproc-per-node: must be >= 1 (got 0)"),
    ],
)
def test_bad_arguments_give_a_one_line_error(args, field, tmp_path):
    result = crate(*args, f"output_dir={tmp_path}", "tokenizer=gpt2")
    assert result.returncode == 2
    assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_data_prepare_and_inspect(tmp_path):
    result = crate("data", "prepare", "shakespeare")
    assert result.returncode == 0, result.stderr
    assert "shakespeare" in result.stdout
    config = tmp_path / "run.yaml"
    config.write_text(
        "tokenizer: gpt2\ndata:\n  seq_len: 64\n  streams_per_rank: 1\n  sources:\n    - builtin: shakespeare\n"
    )
    result = crate("data", "inspect", str(config), "--seconds", "0.5", "--blocks", "2")
    assert result.returncode == 0, result.stderr
    assert "source 0: shakespeare (builtin" in result.stdout and "--- block 1" in result.stdout
    assert "tokens/s" in result.stdout


def test_data_inspect_reports_a_bad_config_in_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  seq_len: 64\n  sources:\n    - path: /nowhere/*.jsonl\n")
    result = crate("data", "inspect", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("data.sources[0].path: no files match '/nowhere/*.jsonl'")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    result = crate("data", "inspect", str(broken))
    assert result.returncode == 2 and f"{broken}:" in result.stderr and "invalid YAML" in result.stderr


def test_only_the_projects_own_errors_become_one_line(monkeypatch, capsys):
    """A ConfigError (or a data error) is the user's to fix: one line, exit 2. Anything else is a bug: it propagates
    with its traceback (exit 1 from the interpreter)."""
    from data_pipeline.errors import BadDataError
    from launcher import cli
    from launcher.errors import ConfigError

    def fails_with(error):
        def command(args):
            raise error

        return command

    for error in (ConfigError("train.max_steps: must be >= 1 (got 0)"), BadDataError("data.sources[0]: 90% bad")):
        monkeypatch.setattr(cli, "_cmd_models", fails_with(error))
        assert cli.main(["models"]) == 2
        assert capsys.readouterr().err == f"crate models: error: {error}\n"
    monkeypatch.setattr(cli, "_cmd_models", fails_with(KeyboardInterrupt()))  # Ctrl-C before a loop took it over
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err == "crate models: interrupted\n"
    for bug in (KeyError("text"), ValueError("a bug"), RuntimeError("NCCL error"), FileNotFoundError("x")):
        monkeypatch.setattr(cli, "_cmd_models", fails_with(bug))
        with pytest.raises(type(bug)):
            cli.main(["models"])


def test_an_empty_output_dir_and_an_export_onto_a_foreign_directory_are_one_line_errors(tmp_path):
    result = crate("pretrain", "configs/lm/crate-tiny.yaml", "output_dir=")  # output_dir=$UNSET
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "crate pretrain: error: configs/lm/crate-tiny.yaml: output_dir: must name a directory (got '')"
    ]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    from launcher.config.run import load_run_config
    from launcher.train.checkpoint import CheckpointManager

    config = load_run_config("configs/lm/crate-tiny.yaml", [f"output_dir={tmp_path / 'run'}"])
    CheckpointManager(config.output_dir, keep_last=1).save(
        5, lambda root, tag: (root / tag).mkdir(parents=True), {"config": config.to_dict()}
    )
    result = crate("export", config.output_dir, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"crate export: error: --out: {tmp_path / 'out'} is not empty and not a crate export; choose another directory"
    ]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory):
    """A 300-token BPE, trained in a moment on a sentence: any tokenizer does for errors that come before tokens."""
    from crate_lm.tokenization import train_bpe_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    (directory / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    train_bpe_tokenizer([directory / "text.txt"], vocab_size=300).save_pretrained(directory)
    return directory


@pytest.mark.timeout(120)
def test_data_inspect_of_data_that_never_gives_a_block_or_an_image_is_one_line(small_tokenizer_dir, tmp_path, capsys):
    """Each case of tests/bad_data.py, and a folder of undecodable images: exit 2 with one line, in bounded time."""
    import json
    import re
    import time

    from launcher.cli import main
    from tests.bad_data import NEVER_SPIN_SECONDS, UNUSABLE_TEXT, undecodable_image_folder, unusable_text

    cases = [(name, *unusable_text(tmp_path, name)) for name in UNUSABLE_TEXT]
    folder = undecodable_image_folder(tmp_path / "images")
    images = {"sources": [{"folder": str(folder)}], "image_size": 28}
    cases.append(("undecodable-images", images, "BadDataError", "found no usable sample"))
    for name, data, _, message in cases:
        config = tmp_path / f"{name}.yaml"
        config.write_text(json.dumps({"tokenizer": str(small_tokenizer_dir), "data": data}))
        started = time.monotonic()
        assert main(["data", "inspect", str(config), "--seconds", "0.2"]) == 2, name
        assert time.monotonic() - started < NEVER_SPIN_SECONDS, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("crate data: error: "), (name, lines)
        assert re.search(message.lstrip("^"), lines[0]), (name, lines)


def test_a_tokenizer_directory_without_tokenizer_files_is_one_line(tmp_path, capsys):
    from launcher.cli import main

    (tmp_path / "tokenizer").mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(f"tokenizer: {tmp_path / 'tokenizer'}\ndata: {{sources: [{tmp_path / 'x.jsonl'}]}}\n")
    assert main(["data", "inspect", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"crate data: error: {config}: tokenizer: {tmp_path / 'tokenizer'} holds no tokenizer files (none of "
        "tokenizer.json, vocab.json + merges.txt, vocab.txt, tokenizer.model)\n"
    )
