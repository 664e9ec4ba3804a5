"""Run configuration: one YAML per run plus dotted command-line overrides, validated once at start.

```yaml
output_dir: runs/crate-tiny
tokenizer: gpt2                    # gpt2 | bpe:N (trained on the run's text at start) | an HF tokenizer directory
model:
  arch: crate                      # crate | gpt2 | vit (HF GPT2LMHeadModel / ViTForImageClassification built from
                                   # the same size knobs)
  preset: crate-tiny               # a crate_lm preset (crate only); size knobs below override it
  hidden_size: 128
  overrides: {ista_lambda: 0.1}    # any other CrateConfig / CrateVisionConfig / GPT2Config / ViTConfig field
  init_from: runs/x/hf             # start from an HF checkpoint (crate finetune); linear_probe: true: the head only
data: {kind: text, ...}            # kind: text | image | labelled (data_pipeline.data_spec; docs/data.md)
eval_data: {sources: [...]}        # held-out data of data's kind; default: the built-in sources' validation (text) /
                                   # test (images) split
train: {max_steps: 200, micro_batch_size: 8, global_batch_size: 16, ...}
                                   # collective_timeout_minutes: 30: a rank without progress for that long
                                   # (a hung or dead peer) stops with one line, and the run with it
optimizer: {lr: 6.0e-4, min_lr: 6.0e-5, warmup_steps: 20, weight_decay: 0.1, betas: [0.9, 0.95]}
zero: {stage: 2, offload_optimizer: false, offload_params: false}
lora: {r: 8, alpha: 16}            # fine-tuning only: LoRA adapters through PEFT (docs/finetuning.md)
precision: auto                    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
```

``crate pretrain CONFIG train.max_steps=20 output_dir=/tmp/run`` overrides any key; the value is read as YAML
(``zero.stage=3``, ``optimizer.betas=[0.9,0.99]``). Every problem is one line naming the key:
``train.micro_batch_size: must be >= 1 (got 0)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_pipeline.data_spec import DATA_SPECS, DataSpec, parse_data
from data_pipeline.errors import DataSpecError
from data_pipeline.files import atomic_write
from data_pipeline.image_spec import ImageDataSpec
from data_pipeline.labelled import LabelledTextSpec
from data_pipeline.spec import TextDataSpec
from launcher.architectures.registry import arch_names, archs_for, for_arch, preset_archs
from launcher.config.files import load_config_tree, read_yaml_value
from launcher.config.validation import first_error
from launcher.errors import ConfigError

BPE_PATTERN = re.compile(r"^bpe:(\d+)$")
MIN_BPE_VOCAB = 257  # 256 bytes + <|endoftext|>


def check_tokenizer_name(name: str) -> str:
    """Config-time check (no files touched): the one-line error names the key."""
    match = BPE_PATTERN.match(name)
    if match and int(match.group(1)) < MIN_BPE_VOCAB:
        raise ValueError(f"bpe:N needs N >= {MIN_BPE_VOCAB} (256 bytes + <|endoftext|>), got {name!r}")
    if name.startswith("bpe") and not match:
        raise ValueError(f"expected bpe:N with an integer N (bpe:4096), got {name!r}")
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSection(_Section):
    arch: str = "crate"  # an architecture of launcher.architectures.registry (crate, gpt2, vit)
    preset: str | None = None
    config_path: str | None = None  # an HF config.json, or a directory holding one
    init_from: str | None = None  # an HF checkpoint directory whose weights the run starts from (fine-tuning)
    linear_probe: bool = False  # with init_from: train the classifier head only (frozen backbone)
    hidden_size: int | None = Field(default=None, ge=1)
    num_hidden_layers: int | None = Field(default=None, ge=1)
    num_attention_heads: int | None = Field(default=None, ge=1)
    max_position_embeddings: int | None = Field(default=None, ge=1)
    vocab_size: int | None = Field(default=None, ge=1)  # default: the tokenizer's size
    patch_size: int | None = Field(default=None, ge=1)  # vision; image_size and channels come from the data
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _registered_arch(cls, value):
        if value not in arch_names():
            raise ValueError(f"unknown architecture {value!r}: allowed values are {arch_names()}")
        return value

    @model_validator(mode="after")
    def _one_origin(self):
        if sum(bool(origin) for origin in (self.preset, self.config_path, self.init_from)) > 1:
            raise ValueError("give at most one of preset, config_path and init_from")
        if self.preset and self.arch not in preset_archs():
            raise ValueError(
                f"preset names presets of {preset_archs()}; a {self.arch} baseline takes hidden_size, "
                "num_hidden_layers, num_attention_heads (or config_path)"
            )
        if self.linear_probe and not self.init_from:
            raise ValueError("linear_probe trains a head on a pretrained backbone: set init_from")
        return self


class TrainSection(_Section):
    max_steps: int = Field(ge=1)
    micro_batch_size: int = Field(default=8, ge=1)
    # default: micro x world size (no accumulation) at a run's first start; a resumed run keeps its checkpoint's
    global_batch_size: int | None = Field(default=None, ge=1)
    seed: int = 0
    log_every: int = Field(default=10, ge=1)
    eval_every: int = Field(default=100, ge=0)  # 0: never
    eval_batches: int = Field(default=8, ge=1)
    # held-out samples per evaluation, whatever the world size (a run that may resume elsewhere); a multiple of
    # micro_batch_size x world size. Default: eval_batches micro-batches per rank
    eval_samples: int | None = Field(default=None, ge=1)
    save_every: int = Field(default=100, ge=0)
    keep_last: int = Field(default=3, ge=1)
    whitebox_every: int = Field(default=0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)  # image classification
    mixup_alpha: float = Field(default=0.0, ge=0)  # image classification: Beta(alpha, alpha) mixing; 0 = off
    cutmix_alpha: float = Field(default=0.0, ge=0)  # with both on, each batch takes one of them at random
    # The HF export (<output_dir>/hf): at the end of the run (max_steps), and, with export_every N, also at every N-th
    # periodic save (steps that are multiples of save_every x N). A run stopped early exports nothing: it resumes,
    # or `crate export RUN` exports its newest checkpoint. (The old export_on_save: true is export_every 1.)
    export_at_end: bool = True
    export_every: int = Field(default=0, ge=0)
    activation_checkpointing: bool = False
    compile: bool = False
    max_nonfinite_in_a_row: int = Field(default=5, ge=1)
    # DataLoader worker processes per rank (tokenizing, decoding and packing off the trainer's thread; they must
    # divide the rank's logical streams). auto: on a GPU the largest divisor of those up to 4, each prefetching
    # 2 batches into pinned memory; on the CPU 0 (a worker would take a core from the training threads).
    dataloader_workers: int | Literal["auto"] = "auto"
    wall_clock_minutes: float | None = Field(default=None, gt=0)  # stop cleanly (save) before this budget ends
    # Signals, the STOP file and the wall clock are agreed by all ranks every this many steps (one all-reduce and a
    # host sync each time: not every step on a GPU); a request waits at most this many steps minus one.
    stop_check_every: int = Field(default=10, ge=1)
    # Resume from checkpoint files whose pickles hold more than tensors and plain values (launcher.train.safe_loading)
    trust_pickled_checkpoints: bool = False
    # A rank that makes no progress for this long (a step, a side job: evaluation, a checkpoint save; the first
    # step's compile) stops with one line: a peer is hung or dead (launcher/train/watchdog.py). The process group's
    # own collective timeout is a minute longer. Every legitimate phase must fit in it.
    collective_timeout_minutes: float = Field(default=30.0, ge=0.1)
    # A batch_fingerprint row in metrics.jsonl after every step: a hash of the step's global batch, the same for any
    # world size or order inside the step (one all-gather per step), to compare runs step by step.
    batch_fingerprints: bool = False

    @field_validator("dataloader_workers", mode="before")
    @classmethod
    def _workers_count_or_auto(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError("must be auto or a whole number >= 0")

    @model_validator(mode="before")
    @classmethod
    def _export_on_save(cls, data):
        """Configs and run directories written before export_every: ``export_on_save: true`` exported at every save,
        ``false`` never."""
        if isinstance(data, dict) and "export_on_save" in data:
            data = dict(data)
            every_save = data.pop("export_on_save")
            if not isinstance(every_save, bool):
                raise ValueError("export_on_save: must be true or false (now train.export_every, train.export_at_end)")
            data.setdefault("export_every", 1 if every_save else 0)
            data.setdefault("export_at_end", every_save)
        return data

    @property
    def exports(self) -> bool:
        """Whether the run writes an HF export at all."""
        return self.export_at_end or bool(self.export_every)

    def export_due(self, step: int) -> bool:
        """Whether the checkpoint saved at ``step`` is also exported."""
        periodic = self.save_every * self.export_every
        return (self.export_at_end and step == self.max_steps) or bool(periodic and step % periodic == 0)


class OptimizerSection(_Section):
    lr: float = Field(default=6e-4, gt=0)
    min_lr: float = Field(default=6e-5, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: Annotated[tuple[float, float], Field(strict=False)] = (0.9, 0.95)  # YAML gives a list
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)  # 0: off

    @model_validator(mode="after")
    def _lr_order(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class ZeroSection(_Section):
    stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3 (zero.stage is 0)")
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params needs ZeRO stage 3 (zero.stage is {self.stage})")
        return self


class LoraSection(_Section):
    """LoRA through PEFT on a run from ``model.init_from``: the pretrained weights stay frozen; the low-rank adapters
    (and a classifier's head, trained whole) learn. ``hf/`` gets the merged model; ``save_adapter`` also writes
    PEFT's adapter folder (``adapter/``, loadable onto the ``init_from`` checkpoint)."""

    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)  # the update is scaled by alpha / r
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # None: PEFT's default for the model type (CRATE: the attention's subspace_proj and out_proj; GPT-2: c_attn);
    # "all-linear": every linear layer but the output head; or module-name suffixes.
    target_modules: list[str] | Literal["all-linear"] | None = None
    target_parameters: list[str] | None = None  # parameters adapted too, e.g. [dictionary]: CRATE's ISTA dictionary
    save_adapter: bool = True


class RunConfig(_Section):
    output_dir: str
    tokenizer: str = "gpt2"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSpec
    eval_data: DataSpec | None = None  # held-out; its kind and shape inherited from data
    train: TrainSection
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    zero: ZeroSection = Field(default_factory=ZeroSection)
    lora: LoraSection | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    deepspeed_config: str | None = None  # a DeepSpeed JSON whose keys override the generated ones

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_name(cls, value):
        return check_tokenizer_name(value)

    @field_validator("output_dir")
    @classmethod
    def _names_a_directory(cls, value):
        # An unset shell variable (output_dir=$RUN) gives '': the run would write into the working directory
        if not value.strip():
            raise ValueError("must name a directory")
        return value

    @property
    def is_image(self) -> bool:
        """An image classification run."""
        return isinstance(self.data, ImageDataSpec)

    @property
    def task(self) -> str:
        """``causal-lm`` (a text stream), ``image-classification`` or ``sequence-classification`` (labelled text)."""
        return (
            "image-classification"
            if self.is_image
            else "sequence-classification"
            if isinstance(self.data, LabelledTextSpec)
            else "causal-lm"
        )

    @model_validator(mode="after")
    def _checkpoint_tokenizer(self):
        if self.model.init_from and self.tokenizer.startswith("bpe:"):
            raise ValueError(
                f"tokenizer: {self.tokenizer} would train a new vocabulary; a run from model.init_from "
                f"uses the checkpoint's tokenizer (leave tokenizer out, or set it to "
                f"{self.model.init_from})"
            )
        return self

    @model_validator(mode="after")
    def _lora_fine_tunes(self):
        if self.lora is not None:
            if not self.model.init_from:
                raise ValueError("lora: adapts a pretrained model; set model.init_from")
            if self.model.linear_probe:
                raise ValueError("lora: a linear probe trains the head only; drop model.linear_probe or lora")
        return self

    @model_validator(mode="after")
    def _consistent_data(self):
        if self.eval_data is not None and self.eval_data.kind != self.data.kind:
            raise ValueError(
                f"eval_data: must be the same kind of data as data ({self.data.kind}), got {self.eval_data.kind}"
            )
        if self.is_image:
            for key in ("image_size", "channels"):
                if self.eval_data is not None and getattr(self.eval_data, key) != getattr(self.data, key):
                    raise ValueError(
                        f"eval_data.{key} ({getattr(self.eval_data, key)}) must equal data.{key} "
                        f"({getattr(self.data, key)}); leave it out to inherit it"
                    )
            _check_modality(self.model.arch, "image")
        elif self.task == "sequence-classification":
            _check_modality(self.model.arch, "text")
            for key in ("label_smoothing", "mixup_alpha", "cutmix_alpha"):
                if getattr(self.train, key):
                    raise ValueError(f"train.{key}: applies to image classification only")
        else:
            if self.eval_data is not None and self.eval_data.seq_len != self.data.seq_len:
                raise ValueError(
                    f"eval_data.seq_len ({self.eval_data.seq_len}) must equal data.seq_len "
                    f"({self.data.seq_len}); leave it out to inherit it"
                )
            _check_modality(self.model.arch, "text")
            for key in ("label_smoothing", "mixup_alpha", "cutmix_alpha"):
                if getattr(self.train, key):
                    raise ValueError(f"train.{key}: applies to image classification only")
        return self

    @model_validator(mode="after")
    def _workers_divide_streams(self):
        # With data.num_streams a rank's streams depend on the world size: the loader checks them when it starts.
        workers, streams = self.train.dataloader_workers, getattr(self.data, "streams_per_rank", None)
        fixed = getattr(self.data, "num_streams", None) is not None
        if isinstance(workers, int) and workers and streams is not None and not fixed and streams % workers:
            raise ValueError(
                f"train.dataloader_workers ({workers}) must divide data.streams_per_rank ({streams}): each worker "
                "runs whole logical streams"
            )
        return self

    @model_validator(mode="after")
    def _whitebox_measured(self):
        entry = for_arch(self.model.arch, "image" if self.is_image else "text")
        if self.train.whitebox_every and not self.model.init_from and entry is not None and entry.whitebox is None:
            raise ValueError(f"train.whitebox_every: {self.model.arch} has no white-box measures; set it to 0")
        return self

    def check_world(self, world_size: int) -> int:
        """Gradient accumulation steps for ``world_size`` ranks; one-line error if the batch sizes don't divide."""
        per_step = self.train.micro_batch_size * world_size
        total = self.train.global_batch_size or per_step
        if total % per_step:
            raise ConfigError(
                f"train.global_batch_size: {total} is not a multiple of train.micro_batch_size "
                f"({self.train.micro_batch_size}) x world size ({world_size})"
            )
        return total // per_step

    def to_dict(self) -> dict:
        """Plain YAML data (the data sections with their ``kind``) that parses back to an equal config."""
        return self.model_dump(mode="json")


def _check_modality(arch: str, modality: str) -> None:
    """The run's ``model.arch`` has a model for its data's modality (``text`` or ``image``)."""
    if for_arch(arch, modality) is None:
        what = "is a language model" if modality == "image" else "classifies images"
        raise ValueError(f"model.arch: {arch} {what}; {modality} data takes {' or '.join(archs_for(modality))}")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values read as YAML) to a nested mapping, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted KEY (train.max_steps=20)")
        try:
            value = read_yaml_value(text) if text else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def parse_run_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        data = raw.get("data")
        if isinstance(data, dict):  # its own validator names its keys (data.sources[0].path: ...)
            data = parse_data(data)
            raw = {**raw, "data": data}
        model = raw.get("model")
        if raw.get("tokenizer") is None:  # absent or null: the checkpoint's own tokenizer when fine-tuning
            init_from = model.get("init_from") if isinstance(model, dict) else None
            raw = {key: value for key, value in raw.items() if key != "tokenizer"}
            if isinstance(init_from, str):
                raw["tokenizer"] = init_from
        if isinstance(raw.get("eval_data"), dict) and isinstance(data, DATA_SPECS):
            raw = {**raw, "eval_data": _held_out_data(data, raw["eval_data"])}
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {first_error(error)}") from None
    except DataSpecError as error:
        raise ConfigError(f"{source}: {error}") from None


def _held_out_data(data: ImageDataSpec | LabelledTextSpec | TextDataSpec, raw: dict):
    """``eval_data``: data's kind, with what must match the training data inherited unless given."""
    kind = raw.get("kind", data.kind)
    if kind != data.kind:
        raise DataSpecError(f"eval_data.kind: must be the kind of data ({data.kind!r}), got {kind!r}")
    if isinstance(data, ImageDataSpec):  # the training image shape and normalisation, no augmentation
        inherited = {
            "image_size": data.image_size,
            "channels": data.channels,
            "mean": list(data.mean),
            "std": list(data.std),
            "split": "test",
        }
    elif isinstance(data, LabelledTextSpec):  # the training fields, length and label names
        inherited = {
            "max_length": data.max_length,
            "text_field": data.text_field,
            "label_field": data.label_field,
            "split": "validation",
        }
        if data.labels:
            inherited["labels"] = list(data.labels)
    else:
        inherited = {"seq_len": data.seq_len}
    return parse_data({"kind": kind, **inherited, **raw}, where="eval_data")


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a run config: the one place a run's settings are checked."""
    raw = load_config_tree(path)
    apply_overrides(raw, list(overrides))
    return parse_run_config(raw, source=str(path))


def save_run_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config (what the run actually uses) beside the run, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
