"""lm-evaluation-harness on exports, for real (no mocks): the shipped offline tasks' documents (built from the
held-out data, deterministic, capped), their scores on a tiny export (finite, in range, every document scored),
``crate eval --lm-eval`` with a task directory of the user's own, the one-line errors (unknown task, missing include
directory, lm-eval not installed), and ``crate compare --lm-eval``'s score table, cached per export."""

from __future__ import annotations

import hashlib
import json
import math
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install '.[eval]'")

from crate_lm import CrateForCausalLM, config_from_preset
from crate_lm.tokenization import gpt2_tokenizer_from_tiktoken
from data_pipeline.builtin import BUILTIN_SOURCES
from data_pipeline.fetch import fetch_gpt2_ranks
from launcher.analysis.harness import run_lm_eval, task_data_file, task_data_names
from launcher.cli import main
from tests.launcher.analysis.test_compare_seeds import fake_run


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The hubs are unreachable here, as on a cluster's compute nodes: nothing may try them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def save_tiny_export(out, seed: int = 0):
    """An untrained crate-test model (width 32, 2 layers, 64 positions) with GPT-2's tokenizer, saved as an export
    (its modeling code beside it, for trust_remote_code)."""
    tokenizer = gpt2_tokenizer_from_tiktoken(fetch_gpt2_ranks())
    torch.manual_seed(seed)
    config = config_from_preset(
        "crate-test", vocab_size=len(tokenizer), bos_token_id=50256, eos_token_id=50256, max_position_embeddings=64
    )
    CrateForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return save_tiny_export(tmp_path_factory.mktemp("lm-eval") / "hf")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_shipped_tasks_documents_are_built_deterministically_from_held_out_data():
    files = {name: task_data_file(name) for name in task_data_names()}
    for corpus in BUILTIN_SOURCES:
        passages = read_jsonl(files[f"ppl-{corpus}"])
        assert len(passages) == 8 and all(500 <= len(row["text"]) <= 1000 for row in passages)
    spans = read_jsonl(files["continuation"])
    assert len(spans) == 100 and {row["corpus"] for row in spans} == set(BUILTIN_SOURCES)
    for row in spans:
        assert len(row["context"].split()) == 12 and len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
        assert all(len(choice.split()) == 6 for choice in row["choices"])
    assert len({row["label"] for row in spans}) == 4  # the true ending is not always in one place
    reviews = read_jsonl(files["rotten-tomatoes"])
    assert [sum(row["label"] == label for row in reviews) for label in (0, 1)] == [100, 100]
    # rebuilt from scratch: the same bytes
    path = files["continuation"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()
    assert hashlib.sha256(task_data_file("continuation").read_bytes()).hexdigest() == digest


def test_shipped_tasks_score_every_document_within_sane_ranges(export):
    result = run_lm_eval(export, ["crate_ppl_shakespeare", "crate_continuation"], batch_size=16)
    assert result["samples"] == {"crate_ppl_shakespeare": 8, "crate_continuation": 100}
    perplexity = result["tasks"]["crate_ppl_shakespeare"]
    assert math.isfinite(perplexity["bits_per_byte"]) and 0 < perplexity["bits_per_byte"] < 20
    assert perplexity["byte_perplexity"] == pytest.approx(2 ** perplexity["bits_per_byte"], rel=1e-6)
    assert perplexity["word_perplexity"] > perplexity["byte_perplexity"] > 1
    choice = result["tasks"]["crate_continuation"]
    assert 0 <= choice["acc"] <= 1 and 0 <= choice["acc_norm"] <= 1 and choice["acc_stderr"] > 0


def test_crate_eval_runs_a_users_task_directory_beside_the_shipped_tasks(export, tmp_path, capsys):
    # the stock offline recipe: dataset_path json with a local data file
    (tmp_path / "tasks").mkdir()
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"Line {i}: to be, or not to be, that is the question."}) + "\n" for i in range(5))
    )
    (tmp_path / "tasks" / "my_ppl.yaml").write_text(
        "task: my_ppl\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        'output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\nmetadata:\n  version: 1.0\n"
    )
    out = tmp_path / "scores.json"
    args = ["eval", str(export), "--lm-eval", "my_ppl,crate_rotten_tomatoes", "--limit", "20", "--out", str(out)]
    assert main([*args, "--lm-eval-include", str(tmp_path / "tasks")]) == 0
    scores = json.loads(out.read_text())["lm_eval"]
    assert scores["samples"] == {"my_ppl": 5, "crate_rotten_tomatoes": 20} and scores["limit"] == 20
    assert scores["tasks"]["my_ppl"]["bits_per_byte"] > 0
    assert 0 <= scores["tasks"]["crate_rotten_tomatoes"]["acc"] <= 1
    assert json.loads(capsys.readouterr().out)["lm_eval"] == scores


def one_line_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.slow  # ~18 s: a name found in no directory is looked up among lm-eval's own ~15,000 tasks first
def test_an_unknown_task_is_a_one_line_error_listing_the_shipped_tasks(export, capsys):
    message = one_line_error(capsys, ["eval", str(export), "--lm-eval", "crate_continuation,no_such_task"])
    assert "unknown lm-eval task 'no_such_task'" in message and "crate_rotten_tomatoes" in message


def test_a_missing_include_directory_and_no_measure_are_one_line_errors(export, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    message = one_line_error(capsys, ["eval", str(export), "--lm-eval", "x", "--lm-eval-include", str(missing)])
    assert message == f"crate eval: error: --lm-eval-include {missing}: no such directory"
    assert "give --data" in one_line_error(capsys, ["eval", str(export)])


def test_without_lm_eval_installed_the_error_names_the_extra(export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra sees: ImportError
    message = one_line_error(capsys, ["eval", str(export), "--lm-eval", "crate_continuation"])
    assert message.endswith("pip install 'crate[eval]'")
    fake_run(tmp_path / "run", 4.0)
    assert "crate[eval]" in one_line_error(
        capsys, ["compare", str(tmp_path / "run"), "--out", str(tmp_path / "r"), "--lm-eval", "x"]
    )


@pytest.mark.slow  # ~20 s: lm-eval on two exports
def test_crate_compare_tabulates_the_scores_of_each_export_and_caches_them(tmp_path):
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"crate-seed{seed}"
        fake_run(run, 4.0 + seed)
        save_tiny_export(run / "hf", seed)
        runs.append(str(run))
    args = ["compare", *runs, "--out", str(tmp_path / "report"), "--lm-eval", "crate_continuation", "--limit", "20"]
    assert main(args) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Downstream scores (lm-evaluation-harness)" in report
    assert "| task | metric | docs | crate-seed0 | crate-seed1 |" in report
    rows = [line for line in report.splitlines() if line.startswith("| crate_continuation | acc")]
    assert len(rows) == 2 and all(row.startswith("| crate_continuation | acc") and "| 20 |" in row for row in rows)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert all(0 <= run["lm_eval"]["tasks"]["crate_continuation"]["acc"] <= 1 for run in summary)
    # a rerun reads each run's cache: nothing is evaluated again (the cache files are not rewritten)
    caches = [next((tmp_path / f"crate-seed{seed}" / "lm_eval").glob("*.json")) for seed in (0, 1)]
    stamps = [path.stat().st_mtime_ns for path in caches]
    assert main(args) == 0
    assert [path.stat().st_mtime_ns for path in caches] == stamps
    assert (tmp_path / "report" / "report.md").read_text() == report
