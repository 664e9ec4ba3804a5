"""Run configs: YAML + dotted overrides, validated once, one-line errors naming the key."""

import copy

import pytest

from launcher.config.run import apply_overrides, load_run_config, parse_run_config, save_run_config
from launcher.errors import ConfigError

BASE = {
    "output_dir": "/tmp/run",
    "data": {"sources": [{"builtin": "shakespeare"}], "seq_len": 64},
    "train": {"max_steps": 10},
}


def parsed(*overrides):
    return parse_run_config(apply_overrides(copy.deepcopy(BASE), list(overrides)), "run.yaml")


def test_defaults_and_overrides():
    config = parsed(
        "train.max_steps=20",
        "zero.stage=3",
        "zero.offload_params=true",
        "optimizer.betas=[0.9, 0.99]",
        "model.overrides.ista_lambda=0.2",
        "output_dir=/tmp/other",
    )
    assert config.train.max_steps == 20 and config.zero.stage == 3 and config.zero.offload_params
    assert config.optimizer.betas == (0.9, 0.99)
    assert config.model.overrides == {"ista_lambda": 0.2} and config.output_dir == "/tmp/other"
    assert config.data.seq_len == 64 and config.precision == "auto"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_steps=0"], "run.yaml: train.max_steps: Input should be greater than or equal to 1 (got 0)"),
        (["train.colour=red"], "run.yaml: train.colour: unknown key"),
        (["optimizer.lr=fast"], "run.yaml: optimizer.lr: Input should be a valid number (got 'fast')"),
        (["train.max_steps=2.5"], "run.yaml: train.max_steps: Input should be a valid integer (got 2.5)"),
        (["zero.stage=4"], "run.yaml: zero.stage: Input should be 0, 1, 2 or 3 (got 4)"),
        (
            ["train.collective_timeout_minutes=0.01"],
            "run.yaml: train.collective_timeout_minutes: Input should be greater than or equal to 0.1 (got 0.01)",
        ),
        (["zero.offload_optimizer=true"], "run.yaml: zero: offload_optimizer needs ZeRO stage 1, 2 or 3"),
        (["zero.stage=2", "zero.offload_params=true"], "run.yaml: zero: offload_params needs ZeRO stage 3"),
        (["optimizer.min_lr=0.1"], "run.yaml: optimizer: min_lr (0.1) must not exceed lr"),
        (["model.arch=gpt2", "model.preset=crate-tiny"], "run.yaml: model: preset names presets of"),
        (["data.seq_len=0"], "run.yaml: data.seq_len: must be >= 1, got 0"),
        (["data.sources=[]"], "run.yaml: data.sources: must be a non-empty list"),
        (["precision=fp16"], "run.yaml: precision: Input should be 'auto', 'fp32' or 'bf16' (got 'fp16')"),
        (["output_dir="], "run.yaml: output_dir: must name a directory (got '')"),  # output_dir=$UNSET
        (["output_dir=' \t'"], "run.yaml: output_dir: must name a directory (got ' \\t')"),
        (["train.export_on_save=3"], "run.yaml: train: export_on_save: must be true or false"),
        (["train.dataloader_workers=many"], "run.yaml: train.dataloader_workers: must be auto or a whole number >= 0"),
        (["train.dataloader_workers=3"], "run.yaml: config: train.dataloader_workers (3) must divide data.streams_per"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        parsed(*overrides)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_missing_sections_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="run.yaml: train: required"):
        parse_run_config({k: v for k, v in BASE.items() if k != "train"}, "run.yaml")
    with pytest.raises(ConfigError, match="run.yaml: output_dir: required"):
        parse_run_config({k: v for k, v in BASE.items() if k != "output_dir"}, "run.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="train.max_steps is not a section"):
        apply_overrides(copy.deepcopy(BASE), ["train.max_steps.x=1"])


def test_batch_sizes_must_divide_by_the_world():
    config = parsed("train.micro_batch_size=4", "train.global_batch_size=16")
    assert config.check_world(2) == 2 and config.check_world(4) == 1
    with pytest.raises(
        ConfigError, match=r"train.global_batch_size: 16 is not a multiple of .* \(4\) x world size \(3\)"
    ):
        config.check_world(3)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = parsed("zero.stage=2", "optimizer.betas=[0.8, 0.9]")
    save_run_config(config, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == config
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {max_steps: 3\n")
    with pytest.raises(ValueError, match=f"{broken}:2: invalid YAML"):
        load_run_config(broken)


def test_exponent_floats_read_as_numbers_in_files_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "output_dir: /tmp/run\ndata: {sources: [{builtin: shakespeare}], seq_len: 64}\n"
        "train: {max_steps: 10}\noptimizer: {lr: 3e-4}\n"
    )
    assert load_run_config(path).optimizer.lr == 3e-4  # YAML 1.1 would read '3e-4' as a string
    assert load_run_config(path, ["optimizer.min_lr=1e-5"]).optimizer.min_lr == 1e-5


def test_base_files_are_merged_under_the_file_and_cycles_are_refused(tmp_path):
    (tmp_path / "recipe.yaml").write_text(
        "data: {sources: [{builtin: shakespeare}], seq_len: 64}\ntrain: {max_steps: 10, micro_batch_size: 4}\n"
    )
    (tmp_path / "run.yaml").write_text("base: recipe.yaml\noutput_dir: /tmp/run\ntrain: {max_steps: 99}\n")
    config = load_run_config(tmp_path / "run.yaml")
    assert config.train.max_steps == 99 and config.train.micro_batch_size == 4 and config.data.seq_len == 64
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="b.yaml: base: a.yaml includes itself"):
        load_run_config(tmp_path / "a.yaml")


def test_eval_data_inherits_seq_len_and_must_match():
    config = parsed("eval_data={sources: [{builtin: brown, split: validation}]}")
    assert config.eval_data.seq_len == 64 and config.eval_data.sources[0].builtin == "brown"
    assert parse_run_config(config.to_dict()).eval_data == config.eval_data  # round trip
    with pytest.raises(ConfigError, match=r"eval_data.seq_len \(32\) must equal data.seq_len \(64\)"):
        parsed("eval_data={sources: [{builtin: brown}], seq_len: 32}")
    with pytest.raises(ConfigError, match=r"eval_data.sources\[0\]"):
        parsed("eval_data={sources: [{colour: red}]}")


@pytest.mark.parametrize("name, message", [("bpe:100", "bpe:N needs N >= 257"), ("bpe:lots", "expected bpe:N")])
def test_bpe_tokenizer_names_are_checked_at_start(name, message):
    with pytest.raises(ConfigError, match=f"tokenizer: {message}"):
        parsed(f"tokenizer={name}")


def test_exports_at_the_end_and_every_nth_save_and_the_old_export_on_save():
    config = parsed("train.max_steps=1000", "train.save_every=100")
    assert [step for step in range(1, 1001) if config.train.export_due(step)] == [1000]  # the default: at the end
    config = parsed("train.max_steps=1000", "train.save_every=100", "train.export_every=3")
    assert [step for step in range(1, 1001) if config.train.export_due(step)] == [300, 600, 900, 1000]
    assert not parsed("train.export_at_end=false").train.exports
    # run directories written before: export_on_save true exported every save, false never
    every = parsed("train.save_every=5", "train.export_on_save=true").train
    assert every.export_every == 1 and every.export_at_end and every.export_due(5) and every.export_due(10)
    never = parsed("train.export_on_save=false").train
    assert not never.exports and not never.export_due(10)
