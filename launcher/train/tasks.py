"""What a run trains on: the part of the loop that differs between language modelling and image classification.

A task owns the data side of one rank — the model config it implies, the batches, the loss of a micro-batch, the
held-out evaluation, the white-box probe, and the preprocessor saved with exports (a tokenizer or an image
processor) — behind one small interface, so that ``launcher.train.loop`` reads the same for both:

* [`LanguageModelingTask`]: tokenize and pack the text stream, next-token loss; validation loss and perplexity on
  fixed held-out blocks.
* [`ImageClassificationTask`]: the streaming image pipeline; cross-entropy with label smoothing and optional
  mixup / cutmix (their draws counter-based on ``(seed, step, micro-batch within the step over all ranks)``, so a
  resumed run mixes exactly as an uninterrupted one, at any world size); validation loss and top-1 accuracy on
  fixed held-out images.

Validation sets are the first ``count`` samples of the held-out data read as one unshuffled stream: the same for
any world size and any resume, so evaluations are comparable along a run and across runs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.errors import BadDataError
from data_pipeline.image_spec import ImageDataSpec, ImageSourceSpec
from data_pipeline.image_stream import ImageLoader, ImageStream, build_image_plan, decode_image
from data_pipeline.labelled import LabelledTextSpec, pad_batch
from data_pipeline.spec import SourceSpec, TextDataSpec
from data_pipeline.stream import new_stats, plan_for_cursor
from data_pipeline.text_stream import LogicalStream, TextLoader, Tokenize, build_plan
from launcher.architectures.flops import image_tokens
from launcher.architectures.registry import training_flops_per_token
from launcher.config.run import RunConfig
from launcher.errors import ConfigError
from launcher.metrics.classification import macro_f1
from launcher.models.build import build_model_config, build_vision_config
from launcher.models.tokenizers import load_tokenizer, prepare_tokenizer
from launcher.train.step import sum_across_ranks

# ----------------------------------------------------------------------------------------------------------------------
# Language modelling
# ----------------------------------------------------------------------------------------------------------------------


def held_out_spec(config: RunConfig) -> TextDataSpec | ImageDataSpec | None:
    """The validation data: ``eval_data`` if given, else the built-in sources' held-out split (text: validation,
    images: test, without augmentation), else ``None``."""
    if config.eval_data is not None:
        return config.eval_data
    if not all(source.kind == "builtin" for source in config.data.sources):
        return None
    if config.is_image:
        sources = tuple(ImageSourceSpec(builtin=s.builtin, split="test", weight=s.weight) for s in config.data.sources)
        return config.data.model_copy(update={"sources": sources, "split": "test", "train": False})
    sources = tuple(SourceSpec(builtin=s.builtin, split="validation", weight=s.weight) for s in config.data.sources)
    return config.data.model_copy(update={"sources": sources})


def fixed_blocks(spec: TextDataSpec, tokenizer, count: int) -> torch.Tensor:
    """The first ``count`` packed blocks of ``spec`` read as one unshuffled stream (count, seq_len)."""
    unshuffled = {"streams_per_rank": 1, "num_streams": None, "open_shards": 1, "shuffle_buffer": 0, "min_shards": 1}
    fixed = spec.model_copy(update=unshuffled)
    stream = LogicalStream(build_plan(fixed, 1), 0, Tokenize(tokenizer))
    return torch.stack([torch.from_numpy(stream.next_block()[0].astype(np.int64)) for _ in range(count)])


def loader_options(config: RunConfig, device: torch.device, streams: int) -> dict:
    """The DataLoader settings of a run on ``device`` whose ranks serve ``streams`` logical streams each: its worker
    processes (``train.dataloader_workers``; ``auto``: on a GPU the largest divisor of ``streams`` up to 4, on the CPU
    none) and, on a GPU, pinned memory so that [`to_device`] copies asynchronously."""
    workers = config.train.dataloader_workers
    if workers == "auto":
        workers = 0 if device.type == "cpu" else max(w for w in range(1, min(4, streams) + 1) if streams % w == 0)
    return {"num_workers": workers, "pin_memory": device.type == "cuda"}


def evaluated_samples(train_cfg, world: int) -> int:
    """The held-out samples of an evaluation: ``train.eval_samples`` (the same at any world size; one-line error when
    ``micro_batch_size x world`` does not divide it), else ``eval_batches`` micro-batches per rank."""
    per_pass = train_cfg.micro_batch_size * world
    if train_cfg.eval_samples is None:
        return train_cfg.eval_batches * per_pass
    if train_cfg.eval_samples % per_pass:
        raise ConfigError(
            f"train.eval_samples: {train_cfg.eval_samples} is not a multiple of train.micro_batch_size "
            f"({train_cfg.micro_batch_size}) x world size ({world}): every rank evaluates as many full micro-batches"
        )
    return train_cfg.eval_samples


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from pinned memory the copy is asynchronous (ordered on the device's stream, so the
    host does not wait for it)."""
    return tensor.to(device, non_blocking=True)


class LanguageModelingTask:
    """Causal language modelling on the packed text stream (CRATE LM or the GPT-2 baseline)."""

    kind = "causal-lm"
    unit = "tokens"

    def __init__(self, config: RunConfig, rank: int, world: int, barrier=lambda: None):
        if rank == 0:  # bpe:N trains once, on rank 0 (a no-op when the launcher's preflight already did)
            prepare_tokenizer(config.tokenizer, config.output_dir, config.data)
        barrier()
        self.config, self.rank, self.world = config, rank, world
        self.tokenizer = load_tokenizer(config.tokenizer, output_dir=config.output_dir)
        self.processor = self.tokenizer
        self.plan = build_plan(config.data, world)
        self.model_config = build_model_config(
            config.model, len(self.tokenizer), self.tokenizer.eos_token_id, config.data.seq_len
        )
        self.tokens_per_sample = config.data.seq_len
        micro = config.train.micro_batch_size
        self.flops_per_token = training_flops_per_token(
            self.model_config, self.tokens_per_sample, micro * self.tokens_per_sample
        )
        held_out, train_cfg = held_out_spec(config), config.train
        self.validation = None
        if held_out is not None and train_cfg.eval_every:
            blocks = fixed_blocks(held_out, self.tokenizer, evaluated_samples(train_cfg, world))
            self.validation = list(blocks[rank::world].split(micro))
        self.probe = fixed_blocks(held_out or config.data, self.tokenizer, micro) if train_cfg.whitebox_every else None

    def loader(self, state: dict | None, device: torch.device):
        plan = plan_for_cursor(self.plan, state)
        return TextLoader(
            plan,
            self.tokenizer,
            self.rank,
            self.config.train.micro_batch_size,
            state=state,
            **loader_options(self.config, device, plan.streams_per_rank),
        )

    def loss(self, engine, batch: dict, device, step: int, micro: int) -> torch.Tensor:
        input_ids = to_device(batch["input_ids"], device)
        return engine(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    @torch.no_grad()
    def evaluate(self, engine, device) -> dict:
        losses = [
            engine(input_ids=b.to(device), labels=b.to(device), use_cache=False).loss.float().item()
            for b in self.validation
        ]
        total, count = sum_across_ranks([sum(losses), len(losses)], device)
        loss = total / count
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50)))}


# ----------------------------------------------------------------------------------------------------------------------
# Image classification
# ----------------------------------------------------------------------------------------------------------------------


def image_processor_for(spec: ImageDataSpec, native_size: tuple[int, int] | None = None):
    """An HF ``ViTImageProcessor`` (greyscale data: ``CrateImageProcessor``, which also converts RGB to luma) that does
    at inference what the run's eval transform does: resize the shorter side to ``image_size / eval_crop_fraction``,
    center-crop ``image_size``, scale, normalise with the run's mean and std. ``native_size``: the size of the data's
    images (the first one); when its shorter side is already ``<= image_size`` the resize goes to ``image_size`` itself,
    the eval transform's small-image rule (Fashion-MNIST's 28 x 28 pass through unchanged)."""
    from transformers import ViTImageProcessor

    from crate_lm import CrateImageProcessor

    small = native_size is not None and min(native_size) <= spec.image_size
    side = spec.image_size if small else max(spec.image_size, round(spec.image_size / spec.eval_crop_fraction))
    settings = dict(
        do_resize=True,
        size={"shortest_edge": side},
        resample=2,
        do_center_crop=True,
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        do_convert_rgb=True,
    )
    # RGB needs nothing beyond HF's own processor (no custom code in the export); greyscale needs the luma step.
    return ViTImageProcessor(**settings) if spec.channels == 3 else CrateImageProcessor(num_channels=1, **settings)


# one unshuffled stream, eval transform: the fixed images of validation and probes
UNSHUFFLED_EVAL = {"streams_per_rank": 1, "num_streams": None, "shuffle_buffer": 0, "min_shards": 1, "train": False}


def first_image_size(spec: ImageDataSpec) -> tuple[int, int]:
    """``(width, height)`` of the first image ``spec`` streams, as decoded (before any transform)."""
    plan = build_image_plan(spec.model_copy(update=UNSHUFFLED_EVAL), 1)
    stream = ImageStream(plan, 0)
    for _ in range(1000):  # skip bad records (the stream counts and reports them)
        _, record = stream.next_record()
        if record.bad is None:
            try:
                return decode_image(record.payload, spec.channels).size
            except Exception:
                continue
    raise BadDataError("data: no decodable image among the first 1000 records")


def fixed_images(spec: ImageDataSpec, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images of ``spec`` (eval transform) read as one unshuffled stream, capped at one pass over
    the data: ``(count, C, H, W)`` pixels and ``(count,)`` labels."""
    fixed = spec.model_copy(update=UNSHUFFLED_EVAL)
    plan = build_image_plan(fixed, 1)
    available = sum(shard.size or 0 for shards in plan.shards for shard in shards)
    if available and all(shard.size for shards in plan.shards for shard in shards):
        count = min(count, available)
    stream = ImageStream(plan, 0)
    pixels, labels = zip(*(stream.next_sample()[:2] for _ in range(count)))
    return torch.from_numpy(np.stack(pixels)), torch.tensor(labels, dtype=torch.long)


def mix_batch(
    pixels: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    label_smoothing: float,
    mixup_alpha: float,
    cutmix_alpha: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets with label smoothing, and mixup or cutmix of the batch with its reverse (as timm pairs them).

    Mixup: ``x = lam x + (1 - lam) x_rev`` with ``lam ~ Beta(a, a)``. Cutmix: a box of area ``(1 - lam) H W`` (centred
    uniformly, clipped to the image) is pasted from ``x_rev`` and ``lam`` is corrected to the pasted area. With both
    on, each batch takes one of them with probability 1/2. Targets mix with the same ``lam``."""
    targets = F.one_hot(labels, num_classes).float() * (1 - label_smoothing) + label_smoothing / num_classes
    if not mixup_alpha and not cutmix_alpha:
        return pixels, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    partner = pixels.flip(0)
    if use_cutmix:
        height, width = pixels.shape[-2:]
        cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        pixels = pixels.clone()
        pixels[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    else:
        pixels = lam * pixels + (1 - lam) * partner
    return pixels, lam * targets + (1 - lam) * targets.flip(0)


def class_names(plan) -> list[str]:
    """The class names of an image plan (from the first source that names them all), else ``class_<i>``."""
    names = next(
        (c.class_names for c in plan.catalogs if c.class_names and len(c.class_names) == plan.num_classes), None
    )
    return list(names or (f"class_{i}" for i in range(plan.num_classes)))


class ImageClassificationTask:
    """Image classification on the streaming image pipeline (CRATE vision or the ViT baseline)."""

    kind = "image-classification"
    unit = "images"

    def __init__(self, config: RunConfig, rank: int, world: int, barrier=lambda: None):
        self.config, self.rank, self.world = config, rank, world
        spec = config.data
        self.plan = build_image_plan(spec, world)
        self.class_names = class_names(self.plan)
        self.model_config = build_vision_config(config.model, spec.image_size, spec.channels, self.class_names)
        self.processor = image_processor_for(spec, first_image_size(spec))
        self.tokens_per_sample = image_tokens(self.model_config)
        self.flops_per_token = training_flops_per_token(self.model_config, self.tokens_per_sample)
        held_out, train_cfg, micro = held_out_spec(config), config.train, config.train.micro_batch_size
        self.validation = None
        if held_out is not None and train_cfg.eval_every:
            pixels, labels = fixed_images(held_out, evaluated_samples(train_cfg, world))
            usable = max(micro * world, len(labels) // (micro * world) * micro * world)  # equal work on every rank
            pixels, labels = pixels[:usable], labels[:usable]
            self.validation = list(zip(pixels[rank::world].split(micro), labels[rank::world].split(micro)))
        self.probe = (
            fixed_images(held_out or spec.model_copy(update={"train": False}), micro)[0]
            if train_cfg.whitebox_every
            else None
        )

    def loader(self, state: dict | None, device: torch.device):
        plan = plan_for_cursor(self.plan, state)
        options = loader_options(self.config, device, plan.streams_per_rank)
        return ImageLoader(plan, self.rank, self.config.train.micro_batch_size, state=state, **options)

    def loss(self, engine, batch: dict, device, step: int, micro: int) -> torch.Tensor:
        train_cfg = self.config.train
        # Keyed by the micro-batch's place in the step over all ranks, as its data is: the same at any world size.
        rng = np.random.default_rng([train_cfg.seed, step, micro * self.world + self.rank])
        pixels, targets = mix_batch(  # on the device: only the mixing weight and the box are drawn on the host
            to_device(batch["pixel_values"], device),
            to_device(batch["labels"], device),
            self.model_config.num_labels,
            train_cfg.label_smoothing,
            train_cfg.mixup_alpha,
            train_cfg.cutmix_alpha,
            rng,
        )
        logits = engine(pixel_values=pixels).logits.float()
        return -(targets * logits.log_softmax(-1)).sum(-1).mean()

    @torch.no_grad()
    def evaluate(self, engine, device) -> dict:
        loss_sum = correct = count = 0.0
        for pixels, labels in self.validation:
            logits = engine(pixel_values=pixels.to(device)).logits.float()
            labels = labels.to(device)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            count += len(labels)
        loss_sum, correct, count = sum_across_ranks([loss_sum, correct, count], device)
        return {"loss": loss_sum / count, "accuracy": correct / count, "images": int(count)}


# ----------------------------------------------------------------------------------------------------------------------
# Sequence classification
# ----------------------------------------------------------------------------------------------------------------------


def held_out_labelled(config: RunConfig) -> LabelledTextSpec | None:
    """The evaluation examples: ``eval_data``, else the built-in sources' ``validation`` split, else ``None``."""
    if config.eval_data is not None:
        return config.eval_data
    if not all(source.builtin for source in config.data.sources):
        return None
    sources = tuple(s.model_copy(update={"split": "validation"}) for s in config.data.sources)
    return config.data.model_copy(update={"sources": sources, "split": "validation"})


class ExampleLoader:
    """A rank's micro-batches of tokenized examples, epoch after epoch, in an order that does not depend on the world
    size: each epoch is a permutation drawn from ``(seed, epoch)``, cut into ``len(examples) // micro_batch_size``
    micro-batches (the last partial one dropped), and the run's ``m``-th micro-batch over all ranks is the epochs'
    ``m``-th; rank ``r`` of ``W`` takes ``m = consumed + c W + r`` (``consumed``: the micro-batches before this start),
    as the streams do (``data_pipeline.stream``). The cursor ``{"consumed": M}`` is the run's count at a step
    boundary and resumes exactly on any world size (``state=``); ``stats()``: the bad records this rank reports
    (``bad_records``, in the streams' statistics form), as a stream loader's."""

    def __init__(
        self,
        encoded: list[list[int]],
        labels: list[int],
        rank: int,
        world: int,
        micro_batch_size: int,
        pad_token_id: int,
        seed: int,
        state: dict | None = None,
        bad_records: dict | None = None,
    ):
        self.encoded, self.labels, self.rank, self.world = encoded, labels, rank, world
        self.bad_records = bad_records or new_stats(())
        self.micro, self.pad, self.seed = micro_batch_size, pad_token_id, seed
        self.per_epoch = len(encoded) // micro_batch_size
        if not self.per_epoch:
            raise ConfigError(f"data: {len(encoded)} examples are fewer than micro_batch_size ({micro_batch_size})")
        if state is not None and "consumed" not in state:
            raise ConfigError(
                "data cursor: a fine-tuning cursor from before the world-size-independent example order; resume it "
                "with the version of crate that wrote it, or start the fine-tune again"
            )
        self.start, self.consumed = (state["consumed"] if state else 0), 0

    def state_dict(self) -> dict:
        return {"consumed": self.start + self.consumed * self.world}

    def stats(self) -> dict:
        """The bad records skipped when the examples were read. Every rank reads them all, so only rank 0's loader
        is given them: summed over the ranks (as the training metrics sum streams' statistics) they count once."""
        return self.bad_records

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.encoded))

    def __iter__(self):
        epoch, order = -1, None
        while True:
            m = self.start + self.consumed * self.world + self.rank
            if m // self.per_epoch != epoch:
                epoch = m // self.per_epoch
                order = self._epoch_order(epoch)
            chosen = order[(m % self.per_epoch) * self.micro : (m % self.per_epoch + 1) * self.micro]
            self.consumed += 1
            yield pad_batch([self.encoded[i] for i in chosen], [self.labels[i] for i in chosen], self.pad)


class SequenceClassificationTask:
    """Text classification (``CrateForSequenceClassification`` or ``GPT2ForSequenceClassification``, usually from a
    pretrained LM via ``model.init_from``): cross-entropy on the last real token; evaluation loss, accuracy and
    macro-F1 over every held-out example."""

    kind = "sequence-classification"
    unit = "examples"

    def __init__(self, config: RunConfig, rank: int, world: int, barrier=lambda: None):
        from data_pipeline.labelled import read_labelled
        from launcher.models.build import build_classifier_config

        self.config, self.rank, self.world = config, rank, world
        if config.tokenizer.startswith("bpe:"):
            raise ConfigError(
                "tokenizer: bpe:N trains on pretraining text; a classifier takes its checkpoint's "
                "tokenizer (the default with model.init_from) or a tokenizer directory"
            )
        self.tokenizer = load_tokenizer(config.tokenizer, output_dir=config.output_dir)
        if self.tokenizer.pad_token is None:  # GPT-2-style tokenizers have none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.processor = self.tokenizer
        spec = config.data
        train = read_labelled(spec)
        self.label_names = train.label_names
        self.model_config = build_classifier_config(
            config.model, len(self.tokenizer), self.tokenizer, self.label_names, spec.max_length
        )
        self.bad_records = train.bad_records
        self.encoded = self._encode(train.texts)
        self.labels = train.labels
        self.tokens_per_sample = spec.max_length
        self.flops_per_token = training_flops_per_token(self.model_config, spec.max_length)
        self.validation = None
        held_out = held_out_labelled(config)
        if held_out is not None and config.train.eval_every:
            examples = read_labelled(held_out, self.label_names)
            self.validation = self._validation_batches(self._encode(examples.texts), examples.labels)
        self.probe = None
        if config.train.whitebox_every:
            first = self.encoded[: config.train.micro_batch_size]
            self.probe = pad_batch(first, self.labels[: len(first)], self.tokenizer.pad_token_id)["input_ids"]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.config.data.max_length)["input_ids"]
        return [ids or [self.tokenizer.eos_token_id] for ids in encoded]

    def _validation_batches(self, encoded, labels) -> list[dict]:
        """This rank's share of every held-out example; ranks with fewer run padding examples of weight 0, so all
        ranks take the same number of forward passes (ZeRO-3 gathers collectively)."""
        micro = self.config.train.micro_batch_size
        mine = list(range(self.rank, len(encoded), self.world))
        per_rank = (len(encoded) + self.world - 1) // self.world
        batches = (per_rank + micro - 1) // micro
        out = []
        for b in range(batches):
            chosen = mine[b * micro : (b + 1) * micro]
            weight = [1.0] * len(chosen) + [0.0] * (micro - len(chosen))
            chosen = chosen + [0] * (micro - len(chosen))
            batch = pad_batch([encoded[i] for i in chosen], [labels[i] for i in chosen], self.tokenizer.pad_token_id)
            batch["weight"] = torch.tensor(weight)
            out.append(batch)
        return out

    def loader(self, state: dict | None, device: torch.device):
        return ExampleLoader(
            self.encoded,
            self.labels,
            self.rank,
            self.world,
            self.config.train.micro_batch_size,
            self.tokenizer.pad_token_id,
            self.config.data.seed,
            state=state,
            bad_records=self.bad_records if self.rank == 0 else None,
        )

    def loss(self, engine, batch: dict, device, step: int, micro: int) -> torch.Tensor:
        return engine(
            input_ids=to_device(batch["input_ids"], device),
            attention_mask=to_device(batch["attention_mask"], device),
            labels=to_device(batch["labels"], device),
        ).loss

    @torch.no_grad()
    def evaluate(self, engine, device) -> dict:
        classes = len(self.label_names)
        loss_sum = count = 0.0
        confusion = np.zeros((classes, classes))
        for batch in self.validation:
            logits = (
                engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                .logits.float()
                .cpu()
            )
            weight = batch["weight"]
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            loss_sum += float((losses * weight).sum())
            count += float(weight.sum())
            for truth, guess, w in zip(batch["labels"].tolist(), logits.argmax(-1).tolist(), weight.tolist()):
                confusion[truth, guess] += w
        totals = sum_across_ranks([loss_sum, count, *confusion.ravel().tolist()], device)
        loss_sum, count, confusion = totals[0], totals[1], np.asarray(totals[2:]).reshape(classes, classes)
        return {
            "loss": loss_sum / count,
            "accuracy": float(np.trace(confusion) / count),
            "macro_f1": macro_f1(confusion),
            "examples": int(count),
        }


TASKS = {
    "causal-lm": LanguageModelingTask,
    "image-classification": ImageClassificationTask,
    "sequence-classification": SequenceClassificationTask,
}


def build_task(config: RunConfig, rank: int, world: int, barrier=lambda: None):
    return TASKS[config.task](config, rank, world, barrier)
