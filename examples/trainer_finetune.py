"""Fine-tune a CRATE (or GPT-2) HF checkpoint with ``transformers.Trainer``: plain, PEFT LoRA, DDP, DeepSpeed.

Nothing here is CRATE-specific: ``import crate_lm`` registers the ``crate`` model type with the ``Auto*`` classes
and CRATE's default LoRA targets with PEFT, and from then on the stock Hugging Face tools take our checkpoints as
they take GPT-2's. ``--model`` is an HF export with its tokenizer (``crate pretrain`` / ``crate finetune`` write one
to ``<output_dir>/hf``)::

    crate pretrain configs/lm/crate-tiny.yaml                       # -> runs/crate-tiny/hf

    # sentiment classification on the built-in Rotten Tomatoes task (a new `score` head on the LM)
    python examples/trainer_finetune.py --model runs/crate-tiny/hf --task sequence-classification \\
        --data rotten-tomatoes --output runs/trainer-rt --max-steps 1500 --batch-size 32 --lr 5e-4

    # continued pretraining of the causal LM on a text file (or `--data rotten-tomatoes`: the review texts)
    python examples/trainer_finetune.py --model runs/crate-tiny/hf --task causal-lm --data my-corpus.txt \\
        --output runs/trainer-lm --max-steps 200 --max-length 128

    # PEFT LoRA on CRATE's default targets (subspace_proj, out_proj; a classifier's `score` head trained whole):
    # the adapter is saved to --output, the merged model to --output/merged
    python examples/trainer_finetune.py ... --lora --lora-r 8 --lr 3e-3

    # DeepSpeed ZeRO-2 through Trainer's integration (one process here; any launcher below for more)
    python examples/trainer_finetune.py ... --deepspeed configs/deepspeed/trainer-zero2.json

    # 2 processes: DDP (gloo on the CPU, NCCL on GPUs), and the same with DeepSpeed ZeRO-2
    accelerate launch --multi_gpu --num_processes 2 examples/trainer_finetune.py ...
    accelerate launch --multi_gpu --num_processes 2 examples/trainer_finetune.py ... \\
        --deepspeed configs/deepspeed/trainer-zero2.json
    torchrun --nproc-per-node 2 examples/trainer_finetune.py ...          # the same without accelerate's CLI

Data (``--data``): for sequence classification ``rotten-tomatoes`` (train split; evaluated on its validation split)
or a labelled ``.csv`` / ``.jsonl`` / ``.json`` file with ``text`` and ``label`` fields, read by
``data_pipeline.labelled`` as ``crate finetune`` reads it; for the causal LM a text file (one stream), a ``.jsonl``
file (its ``text`` fields) or ``rotten-tomatoes`` (the reviews, joined by EOS). The evaluation set is
``--eval-data``, else Rotten Tomatoes' validation split, else a random 10% of a labelled file / the last 10% of a
text. Texts are tokenized once; a classifier's batches are padded per batch (``DataCollatorWithPadding``); the
causal LM's text is cut into blocks of ``--max-length`` tokens, labels = inputs (HF's ``run_clm`` recipe:
``default_data_collator``, so the EOS between documents stays a target, which ``DataCollatorForLanguageModeling``
would mask as the pad token).

Output: ``--output`` holds the model (or the LoRA adapter) and the tokenizer, ready for ``from_pretrained`` and
``pipeline``; the last line on stdout (rank 0's) is a JSON object of metrics: accuracy and macro-F1 (classifier) or
eval loss and perplexity (causal LM), ``initial_eval_*`` too with ``--eval-before``.

CPU notes: what each path needed to run on a machine without GPUs, and why.

* ``accelerate launch --cpu --num_processes 2`` starts ONE process: accelerate's ``--cpu`` is the single-process
  launcher (several CPU processes need ``mpirun``). ``--multi_gpu`` is what starts N processes (torchrun), on CPUs
  too; ``torchrun`` directly does the same.
* Plain DDP: the script passes ``use_cpu=True`` when no accelerator is present, because accelerate makes a
  multi-process run distributed on the CPU (``MULTI_CPU``, gloo) only when told it is on the CPU; otherwise every
  process trains alone as rank 0 of 1.
* DeepSpeed: Trainer sets up DeepSpeed's process state without a backend, which accelerate takes for "not
  distributed" on the CPU (each process again rank 0 of 1, and ``train_batch_size`` "auto" then fails DeepSpeed's
  batch check). The script sets accelerate's state up first with gloo and hands it to Trainer
  (``accelerator_config={"use_configured_state": True}``). A single process without a launcher gets a one-process
  world (``RANK`` ... ``MASTER_PORT``), else DeepSpeed looks for MPI (``mpi4py``).
* DeepSpeed JIT-builds its small CPU comm op on first use (about a minute, cached in ``~/.cache/torch_extensions``).
  ``configs/deepspeed/trainer-zero2.json`` sets ``"torch_adam": true``: torch's AdamW, as the non-DeepSpeed path
  uses; without it DeepSpeed JIT-builds its CPU ``FusedAdam`` op as well (that works too).
* Not CPU-specific: Trainer multiplies the loss by the number of processes when the model's ``forward`` takes
  ``**kwargs`` (it expects the model to divide by the item count of the global batch). Our classifiers take the
  mean over their own batch and say so (``accepts_loss_kwargs = False``); the causal LM does divide by
  ``num_items_in_batch``. HF's own classifiers (the GPT-2 baseline) do not declare it, so for classification the
  script also passes ``average_tokens_across_devices=False``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

TASKS = ("sequence-classification", "causal-lm")
ROTTEN_TOMATOES = "rotten-tomatoes"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an HF checkpoint directory (with its tokenizer)")
    parser.add_argument("--task", choices=TASKS, default="sequence-classification")
    parser.add_argument(
        "--data",
        default=ROTTEN_TOMATOES,
        help="rotten-tomatoes, a labelled .csv/.jsonl/.json file (classification) or a text/.jsonl file (causal LM)",
    )
    parser.add_argument("--eval-data", default=None, help="held-out data in --data's format (default: see above)")
    parser.add_argument("--output", required=True, help="where the fine-tuned model (or adapter) is saved")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --max-steps")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example / per causal-LM block")
    parser.add_argument("--lora", action="store_true", help="train a PEFT LoRA adapter instead of every weight")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * --lora-r")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON (HF 'auto' values allowed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-before", action="store_true", help="also evaluate before training")
    parser.add_argument("--logging-steps", type=int, default=20)
    parser.add_argument("--use-cpu", action="store_true", help="train on the CPU even if an accelerator is present")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------- data


def _labelled_source(data: str, split: str) -> dict:
    return {"builtin": data, "split": split} if data == ROTTEN_TOMATOES else {"path": data}


def classification_data(args, label_names: tuple[str, ...] | None):
    """``(train, eval)`` examples as ``{"text", "label"}`` lists, and the label names (ids index them)."""
    from data_pipeline.labelled import parse_labelled_text, read_labelled

    def read(data: str, split: str, names):
        spec = parse_labelled_text({"sources": [_labelled_source(data, split)], "max_length": args.max_length})
        return read_labelled(spec, names)

    train = read(args.data, "train", label_names)
    names = train.label_names
    rows = [{"text": t, "label": y} for t, y in zip(train.texts, train.labels)]
    if args.eval_data or args.data == ROTTEN_TOMATOES:
        held_out = read(args.eval_data or args.data, "validation", names)
        return rows, [{"text": t, "label": y} for t, y in zip(held_out.texts, held_out.labels)], names
    cut = len(rows) - max(1, len(rows) // 10)
    order = np.random.default_rng(args.seed).permutation(len(rows))
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]], names


def _documents(data: str, split: str) -> list[str]:
    if data == ROTTEN_TOMATOES:
        from data_pipeline.labelled import rotten_tomatoes

        return [row["text"] for row in rotten_tomatoes(split)]
    path = Path(data)
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [path.read_text(encoding="utf-8")]


def token_blocks(documents: list[str], tokenizer, length: int) -> list[list[int]]:
    """The documents tokenized as one stream (joined by EOS) and cut into blocks of ``length`` tokens."""
    ids: list[int] = []
    for encoded in tokenizer(documents, verbose=False)["input_ids"]:  # (no warning: longer than the model takes)
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]


def causal_lm_data(args, tokenizer):
    """``(train, eval)`` lists of ``{"input_ids", "labels"}`` blocks."""
    train = token_blocks(_documents(args.data, "train"), tokenizer, args.max_length)
    if args.eval_data or args.data == ROTTEN_TOMATOES:
        held_out = token_blocks(_documents(args.eval_data or args.data, "validation"), tokenizer, args.max_length)
    else:
        cut = len(train) - max(1, len(train) // 10)
        train, held_out = train[:cut], train[cut:]
    if not train or not held_out:
        raise SystemExit(f"--data: too little text for blocks of --max-length {args.max_length} tokens")
    return (
        [{"input_ids": b, "labels": list(b)} for b in train],
        [{"input_ids": b, "labels": list(b)} for b in held_out],
    )


# ------------------------------------------------------------------------------------------------------------ model


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_labels(model_dir: str) -> tuple[str, ...] | None:
    """The label names of a classifier checkpoint (None for a language model)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if not (config.architectures or [""])[0].endswith("ForSequenceClassification"):
        return None
    return tuple(config.id2label[i] for i in range(config.num_labels))


def load_model(args, tokenizer, label_names: tuple[str, ...] | None = None):
    """The model to train: a classifier (a language model's transformer under a new ``score`` head, or a classifier
    checkpoint as it is) or the causal LM; wrapped in a PEFT LoRA model with ``--lora``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if args.task == "sequence-classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    if args.max_length > getattr(model.config, "max_position_embeddings", args.max_length):
        raise SystemExit(
            f"--max-length {args.max_length} exceeds the model's max_position_embeddings "
            f"({model.config.max_position_embeddings})"
        )
    if args.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        # No target_modules: PEFT's table has CRATE's defaults (crate_lm/lora.py) and GPT-2's; a classifier's
        # `score` head is trained whole (modules_to_save, PEFT's default for SEQ_CLS).
        if Path(args.model).is_dir():  # the adapter records its base model: make it usable from anywhere
            model.name_or_path = str(Path(args.model).resolve())
        task_type = TaskType.SEQ_CLS if args.task == "sequence-classification" else TaskType.CAUSAL_LM
        config = LoraConfig(task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r)
        model = get_peft_model(model, config)
    return model


# ---------------------------------------------------------------------------------------------------------- trainer


def classification_metrics(eval_pred) -> dict:
    """Accuracy and macro-F1 (``launcher.metrics.classification.macro_f1``, as ``crate finetune`` reports them)."""
    from launcher.metrics.classification import macro_f1

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    classes = logits.shape[-1]
    confusion = np.zeros((classes, classes))
    np.add.at(confusion, (labels, logits.argmax(-1)), 1)
    return {"accuracy": float(np.trace(confusion) / confusion.sum()), "macro_f1": macro_f1(confusion)}


def _no_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, MPS, XPU, ...
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def distributed_setup(args) -> dict:
    """Process set-up and ``TrainingArguments`` keywords for DeepSpeed and the CPU (see the module docstring)."""
    if args.deepspeed and "LOCAL_RANK" not in os.environ:
        # DeepSpeed needs a process group even for one process; without a launcher it looks for MPI
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    if not (args.use_cpu or _no_accelerator()):
        return {}
    if not args.deepspeed:
        # accelerate makes a multi-process CPU run distributed (gloo) only when told it is on the CPU
        return {"use_cpu": True}
    # Trainer sets up DeepSpeed's process state with no backend, which accelerate takes for "not distributed" on the
    # CPU: every process would believe it is rank 0 of 1. Set the state up first, with gloo, and have Trainer use it.
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"accelerator_config": {"use_configured_state": True}}


def build_trainer(args):
    """Tokenizer, data, model and ``transformers.Trainer`` for ``args``; nothing trained yet."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator, set_seed

    import crate_lm  # noqa: F401  (registers `crate` with the Auto classes and CRATE's LoRA targets with PEFT)

    set_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    if args.task == "sequence-classification":
        train_rows, eval_rows, names = classification_data(args, checkpoint_labels(args.model))

        def tokenize(batch):
            return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

        train = Dataset.from_list(train_rows).map(tokenize, batched=True, remove_columns=["text"])
        held_out = Dataset.from_list(eval_rows).map(tokenize, batched=True, remove_columns=["text"])
        collator, compute_metrics = DataCollatorWithPadding(tokenizer), classification_metrics
    else:
        train_rows, eval_rows = causal_lm_data(args, tokenizer)
        train, held_out = Dataset.from_list(train_rows), Dataset.from_list(eval_rows)
        names, collator, compute_metrics = None, default_data_collator, None
    model = load_model(args, tokenizer, names)
    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 32),
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 20),
        weight_decay=args.weight_decay,
        seed=args.seed,
        eval_strategy="no",  # evaluated once, at the end (and at the start with --eval-before)
        save_strategy="no",  # the final model is saved below
        logging_steps=args.logging_steps,
        report_to=[],
        dataloader_num_workers=0,
        deepspeed=args.deepspeed,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,  # every trainable weight takes part in each forward pass
        # Ours declare it (accepts_loss_kwargs = False), but HF's own classifiers (the GPT-2 baseline) do not, and
        # Trainer would multiply their per-process mean loss by the number of processes
        average_tokens_across_devices=args.task == "causal-lm",
        **distributed_setup(args),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    return trainer, tokenizer


def evaluation(trainer, args, prefix: str = "eval") -> dict:
    """Loss and accuracy / macro-F1 (classifier) or loss and perplexity (causal LM) on the held-out set."""
    metrics = trainer.evaluate(metric_key_prefix=prefix)
    keep = ("loss", "accuracy", "macro_f1", "runtime")
    metrics = {key: value for key, value in metrics.items() if key.removeprefix(f"{prefix}_") in keep}
    if args.task == "causal-lm":
        metrics[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_loss"], 700.0))
    return metrics


def save(trainer, tokenizer, args) -> None:
    """The model (or the LoRA adapter, and the merged model in ``--output/merged``) and the tokenizer."""
    trainer.save_model(args.output)  # rank 0 only; gathers DeepSpeed's weights; writes the tokenizer too
    if args.lora and trainer.is_world_process_zero():
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(Path(args.output) / "merged")
        tokenizer.save_pretrained(Path(args.output) / "merged")
    trainer.accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    trainer, tokenizer = build_trainer(args)
    metrics: dict = {
        "task": args.task,
        "model": args.model,
        "lora": args.lora,
        "deepspeed": args.deepspeed,
        "world_size": trainer.args.world_size,
        "distributed_type": trainer.accelerator.distributed_type.value,
    }
    if args.eval_before:
        metrics.update(evaluation(trainer, args, "initial_eval"))
    result = trainer.train()
    metrics.update({key: value for key, value in result.metrics.items() if key in ("train_loss", "train_runtime")})
    metrics["steps"] = result.global_step
    metrics["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    metrics.update(evaluation(trainer, args))
    save(trainer, tokenizer, args)
    if trainer.is_world_process_zero():
        print(json.dumps(metrics), flush=True)
    return metrics


if __name__ == "__main__":
    main()
