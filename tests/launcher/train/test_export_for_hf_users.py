"""An export as a plain `transformers` user takes it, without this package: every head of the family loads, the
tokenizer loads with no prompt, no spurious warning, and a model card says what the model is."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # the pretrained_lm fixture: a few minutes, shared with the fine-tuning tests

PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import importlib.abc, sys

    class RefuseThisProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("crate_lm", "launcher", "data_pipeline"):
                raise ImportError(name + " is deliberately unavailable in this process")

    sys.meta_path.insert(0, RefuseThisProject())
    from transformers import (
        AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline,
    )

    export = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    for auto in (AutoModel, AutoModelForCausalLM):
        print(auto.__name__, type(auto.from_pretrained(export, trust_remote_code=True)).__name__)
    classifier = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True, num_labels=2)
    print("AutoModelForSequenceClassification", type(classifier).__name__, classifier.config.num_labels)
    generator = pipeline("text-generation", model=export, tokenizer=tokenizer, trust_remote_code=True)
    text = generator("The king", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    print("generated", text.startswith("The king"))
    assert not any(name.split(".")[0] == "crate_lm" for name in sys.modules)
    """
)


def test_every_head_loads_in_plain_transformers_with_no_prompt_and_a_model_card(pretrained_lm, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TRANSFORMERS)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), str(pretrained_lm)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,  # a prompt would read EOF and fall back with a warning: both are caught below
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "AutoModel CrateModel",
        "AutoModelForCausalLM CrateForCausalLM",
        "AutoModelForSequenceClassification CrateForSequenceClassification 2",
        "generated True",
    ]
    for unwanted in ("Do you wish to run the custom code", "You are using a model of type", "Traceback"):
        assert unwanted not in result.stderr, result.stderr[-3000:]

    card = (pretrained_lm / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    for fact in ("preset `crate-tiny`", "Parameters: ", "optimizer steps", "Tokens seen: ", "Final training loss: "):
        assert fact in card, card
    assert "AutoModelForCausalLM.from_pretrained" in card and "trust_remote_code=True" in card
