"""Training: the LightningModule, its optimizer and schedule, and :func:`fit`, the library entry point.

``fit(cfg)`` runs one recipe end to end: model (fresh or from an earlier export), data, Lightning Trainer,
checkpoints, sample captions, and the export folder that :class:`altogether.Recaptioner` loads.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import signal
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .config import ConfigError, RecipeConfig, accumulation_steps, to_container, to_yaml
from .data.datamodule import MAX_SKIP_REASONS, CaptionDataModule, open_sources
from .data.images import load_image
from .data.readers import IMAGE_EXTENSIONS, detect_format
from .data.records import BadRecord, Record
from .export import (export_model_config, is_lora, layout_from, load_export, merge_adapter, read_export_config,
                     save_export)
from .io import atomic_open, remove_stale_temporaries
from .model import AltogetherModel, causal_lm, load_tokenizer
from .recaptioner import Recaptioner

log = logging.getLogger(__name__)


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, weight decay on matrices only (not on biases and norm scales)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def checkpoint_activations(model: AltogetherModel) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them."""
    causal_lm(model.decoder).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_decoder_trainable(model: AltogetherModel, mode: str, lora=None) -> AltogetherModel:
    """``full``: every decoder weight trains; ``frozen``: none; ``lora``: a peft LoRA adapter only.

    A decoder that already carries an adapter (``init_from`` a LoRA export) has it merged first: the next
    stage trains on top of the merged weights.
    """
    if is_lora(model.decoder):
        model.decoder = merge_adapter(model.decoder)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none")
        model.decoder = get_peft_model(model.decoder, config)
    else:
        model.decoder.requires_grad_(mode == "full")
    return model


class TrainingDataError(ValueError):
    """The run cannot train on its data: no sample of an optimizer step could be read, or more than
    ``data.max_skipped_fraction`` of them were skipped. The message names the likely cause and the first reasons."""


class CaptionerModule(L.LightningModule):
    """Caption loss, AdamW + warm-up/cosine, and logging; the frozen encoder stays out of optimizer and checkpoints.

    The loss of an optimizer step is the mean cross-entropy over every caption + EOS token of its global batch
    (all micro-batches of every rank), whatever the split: each micro-batch's summed token losses are divided by
    the step's token count, which the collate function counted on the host (:func:`collate_group`) and one
    all-reduce per step sums over ranks. Batches with skipped samples are counted over all ranks too; the run
    stops with :class:`TrainingDataError` when the data cannot be read (checked on the first step and then every
    ``trainer.log_every_n_steps`` steps, when the counts are read back from the device).
    """

    def __init__(self, model: AltogetherModel, cfg: RecipeConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.truncated_total = 0  # this rank's
        self.data_counts = torch.zeros(2, dtype=torch.long)  # samples read and samples skipped, all ranks
        self.skip_reasons: list[str] = []  # this rank's first few
        self._checked_once = False

    def on_fit_start(self) -> None:
        # Lightning 2.6 leaves modules in the mode it finds them, and from_pretrained and load_export return eval
        # mode: without this, dropout (OPT-1.3B's 0.1) would never run. Validation and sample captions switch to
        # eval mode and back.
        self.model.train()

    @property
    def skipped_total(self) -> int:
        return int(self.data_counts[1])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if batch["micro_index"] == 0:
            self._start_group(batch)
        self.truncated_total += batch["num_truncated"]
        if batch["num_tokens"]:
            token_sum = self.model.token_losses(batch)[0].sum()
        else:  # every sample was unreadable: a zero loss that still reaches every trainable weight, so that the
            # gradient all-reduce of DDP runs on this rank as on the others
            token_sum = sum(p.flatten()[0] for p in self.parameters() if p.requires_grad) * 0.0
        share = token_sum / self._group_tokens.clamp(min=1)  # this micro-batch's part of the step's token mean
        self._step_loss = share.detach() if batch["micro_index"] == 0 else self._step_loss + share.detach()
        if batch["micro_index"] == batch["group_size"] - 1:
            self._log_step()
        # Lightning divides the returned loss by accumulate_grad_batches and DDP/FSDP average gradients over ranks;
        # undoing both leaves the gradient of (sum of the step's token losses) / (the step's token count).
        return share * (self.trainer.accumulate_grad_batches * self.trainer.world_size)

    def _start_group(self, batch: dict[str, Any]) -> None:
        """The step's totals over all ranks (one all-reduce, no host wait) and, when due, the data check."""
        counts = torch.tensor([batch["group_tokens"], batch["group_samples"], batch["group_skipped"]])
        if self.trainer.world_size > 1:
            counts = counts.to(self.device)
            torch.distributed.all_reduce(counts)
        self._group_tokens = counts[0]
        self.data_counts = self.data_counts.to(counts.device) + counts[1:]
        self.skip_reasons = (self.skip_reasons + batch["skip_reasons"])[:MAX_SKIP_REASONS]
        if not self._checked_once or self.trainer.global_step % self.cfg.trainer.log_every_n_steps == 0:
            self._checked_once = True
            self._check_data(*counts[1:].tolist())

    def _log_step(self) -> None:
        loss = self._step_loss
        if self.trainer.world_size > 1:  # each rank holds its part of the global token mean
            torch.distributed.all_reduce(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        self.log("train/caption_tokens", self._group_tokens.float(), batch_size=1)
        self.log("data/skipped_total", self.data_counts[1].float(), batch_size=1)
        self.log("data/truncated_captions_total", float(self.truncated_total), reduce_fx="max", batch_size=1)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=1)

    def _check_data(self, step_samples: int, step_skipped: int) -> None:
        """Raise :class:`TrainingDataError` when this step read nothing or too much was skipped so far."""
        seen, skipped = self.data_counts.tolist()
        limit = self.cfg.data.max_skipped_fraction
        if step_skipped == step_samples:
            what = f"none of the {step_samples} samples of optimizer step {self.trainer.global_step} could be read"
        elif skipped > limit * seen:
            what = (f"{skipped} of the {seen} training samples so far could not be used, more than "
                    f"data.max_skipped_fraction={limit}")
        else:
            return
        raise TrainingDataError(f"{what}; {_likely_cause(self.cfg)}; first reasons: "
                                + " | ".join(" ".join(r.split()) for r in self.skip_reasons))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "labels" not in batch:
            return
        out = self.model(batch)
        # Weighted by tokens: the epoch's val/loss is the mean over every caption token, as train/loss is.
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=batch["num_tokens"])

    def configure_optimizers(self):
        o = self.cfg.optim
        # The fused kernel keeps the step count on the device: the foreach/single-tensor paths read it back. Under
        # mixed precision (bf16-mixed, the default on a GPU) Lightning refuses to clip the gradients of an optimizer
        # that unscales them itself, as the fused one does, so with clipping that run takes the foreach path.
        mixed = "mixed" in _precision(self.cfg)
        fused = self.device.type in ("cuda", "cpu") and not (mixed and o.grad_clip)
        optimizer = torch.optim.AdamW(parameter_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                      eps=o.eps, fused=fused or None)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, warmup_steps=o.warmup_steps, max_steps=o.max_steps,
                                   min_lr_ratio=o.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen encoder is rebuilt from its reference; copying it into every checkpoint would cost GBs.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.encoder.")}
        seen, skipped = self.data_counts.tolist()
        checkpoint["altogether_counts"] = {"seen": seen, "skipped": skipped, "truncated": self.truncated_total}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        encoder = {k: v for k, v in self.state_dict().items() if k.startswith("model.encoder.")}
        checkpoint["state_dict"].update(encoder)
        counts = checkpoint.get("altogether_counts", {})
        self.data_counts = torch.tensor([counts.get("seen", 0), counts.get("skipped", 0)])
        self.truncated_total = counts.get("truncated", 0)


def _likely_cause(cfg: RecipeConfig) -> str:
    """Where to look when training data cannot be read, for the data source of ``cfg``."""
    d = cfg.data
    if d.format == "webdataset" or d.format == "auto" and d.train and detect_format(d.train) == "webdataset":
        sources = None if d.alt_text_sources is None else list(d.alt_text_sources)
        return (f"check the shards {d.train!r}: each sample needs an image member ({', '.join(IMAGE_EXTENSIONS)}) "
                f"and alt-texts (JSON texts or caption, or a .txt member); data.alt_text_sources={sources}")
    root = d.image_root or "the data file's folder"
    target = f", data.target_key={d.target_key!r}" if d.task == "finetune" else ""
    return (f"check data.image_root (relative image paths are joined to {root}) and the column names "
            f"data.image_key={d.image_key!r}, data.alt_key={d.alt_key!r}{target}")


class SampleCaptions(Callback):
    """Greedy captions of a few fixed validation images, with and without their alt-text, every N steps.

    Written to ``<run>/samples.jsonl`` and the log so a run's progress can be read, not only its loss.
    """

    def __init__(self, records: Sequence[Record], tokenizer, transform: Callable, cfg: RecipeConfig, path: Path):
        self.records, self.tokenizer, self.transform, self.cfg, self.path = records, tokenizer, transform, cfg, path
        self.every = cfg.trainer.sample_every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.records or step == 0 or step % self.every or not trainer.is_global_zero:
            return
        if getattr(self, "_last", None) == step:  # several micro-batches share a step under accumulation
            return
        self._last = step
        lines = caption_records(pl_module.model, self.records, self.tokenizer, self.transform, self.cfg)
        with self.path.open("a") as f:
            for line in lines:
                f.write(json.dumps({"step": step, **line}) + "\n")
        for line in lines:
            log.info("step %d sample %s | alt: %r -> %r | no alt -> %r", step, line["key"], line["alt_text"],
                     line["with_alt"], line["without_alt"])


def caption_records(model: AltogetherModel, records: Sequence[Record], tokenizer, transform, cfg) -> list[dict[str, str]]:
    """Greedy captions (at most 64 new tokens, the recipe's other generation settings) of records with and
    without their prompt, through :class:`~altogether.recaptioner.Recaptioner`'s inference path (logged samples)."""
    captioner = Recaptioner(model, tokenizer, transform, cfg.layout, cfg.generation)
    generation = captioner.settings(do_sample=False, max_new_tokens=min(64, cfg.generation.max_new_tokens))
    cached = all("image_embeds" in r.extra for r in records)

    def prepared(alt_texts: Sequence) -> list:
        return [captioner.prepare.embedded(r.extra["image_embeds"], alt) if cached else
                captioner.prepare(r.image, alt, key=r.key) for r, alt in zip(records, alt_texts)]

    with_alt, without_alt = prepared([r.alt_texts for r in records]), prepared([None] * len(records))
    a, b = ([captions[0] for captions in captioner.caption(items, generation)] for items in (with_alt, without_alt))
    return [{"key": r.key, "alt_text": item.prompt.text, "with_alt": x, "without_alt": y}
            for r, item, x, y in zip(records, with_alt, a, b)]


def readable_sample_records(source: Sequence[Record], count: int) -> list[Record]:
    """The first ``count`` records of ``source`` whose image decodes (or that carry cached embeddings): the
    sample captions' images. Unreadable ones are skipped, as the training loop skips them, and counted in the log."""
    chosen, skipped = [], []
    for i in range(len(source)):
        if len(chosen) == count:
            break
        try:
            record = source[i]
            if "image_embeds" not in record.extra:
                load_image(record.image, key=record.key)
        except BadRecord as err:
            skipped.append(str(err))
            continue
        chosen.append(record)
    if skipped:
        log.warning("sample captions: skipped %d unreadable validation record(s): %s", len(skipped),
                    " | ".join(" ".join(r.split()) for r in skipped[:MAX_SKIP_REASONS]))
    return chosen


def build_model(cfg: RecipeConfig, device: str = "cpu"):
    """(model, tokenizer, transform) for a recipe: from ``init_from`` (an export) or from the model config.

    Training from cached embeddings builds no image encoder at all.
    """
    with_encoder = not cfg.data.use_cache
    if cfg.init_from:
        # The recipe's resize policy, not the export's: it is the one this run's export will record.
        model, tokenizer, transform, _ = load_export(cfg.init_from, device=device, with_encoder=with_encoder,
                                                     resize_mode=cfg.model.encoder.resize_mode)
    else:
        tokenizer = load_tokenizer(cfg.model.decoder)
        model, transform = AltogetherModel.from_config(cfg.model, tokenizer, device=device, with_encoder=with_encoder)
    set_decoder_trainable(model, cfg.model.decoder.trainable, cfg.model.decoder.lora)
    return model, tokenizer, transform


def _precision(cfg: RecipeConfig) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "32-true"


# The packages each optional logger needs (any one of them), and the extra that installs them.
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_run_settings(cfg: RecipeConfig, run_dir: Path) -> None:
    """Settings that depend on this machine, checked before any model loads; raises :class:`ConfigError`."""
    import importlib.util

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"key 'output_dir': {run_dir} is a file; give a folder for the run")
    t = cfg.trainer
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"key 'trainer.accelerator': {t.accelerator} but torch sees no CUDA GPU on this machine; "
                          "use trainer.accelerator=auto or cpu")
    packages = LOGGER_PACKAGES.get(t.logger, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise ConfigError(f"key 'trainer.logger': {t.logger} needs the {packages[0]} package: "
                          f"pip install 'altogether[{t.logger}]'")


def _loggers(cfg: RecipeConfig, run_dir: Path) -> list:
    """The CSV log (``logs/version_N/metrics.csv``, read by ``plot`` and the report) and the chosen logger."""
    from lightning.pytorch import loggers

    chosen = [loggers.CSVLogger(str(run_dir), name="logs")]
    if cfg.trainer.logger == "tensorboard":
        chosen.append(loggers.TensorBoardLogger(str(run_dir), name="tensorboard"))
    if cfg.trainer.logger == "wandb":
        chosen.append(loggers.WandbLogger(save_dir=str(run_dir), name=cfg.recipe))
    return chosen


def _strategy(cfg: RecipeConfig):
    if cfg.trainer.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(use_orig_params=True)
    return cfg.trainer.strategy


def _world_size(cfg: RecipeConfig) -> int:
    devices = cfg.trainer.devices
    if isinstance(devices, int):
        count = devices
    elif isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        count = len(devices)
    elif torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda"):
        count = torch.cuda.device_count() if devices in ("auto", -1, "-1") else int(devices)
    else:
        count = 1 if devices == "auto" else int(devices)
    return count * cfg.trainer.num_nodes


CHECKPOINT_DIR = "checkpoints"  # under the run folder
LAST_CHECKPOINT = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoints, each written to a temporary file in its own folder and renamed into place.

    Lightning's writer stages the file in the system temporary folder and moves it, which is a copy when that is
    another filesystem (tmpfs ``/tmp``, node-local scratch with the run on NFS): a kill mid-copy left a half
    ``last.ckpt``. Here a checkpoint is whole or absent; a kill mid-write leaves only ``.NAME.XXXX.tmp``, which
    the next run removes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_open(path) as f:
            torch.save(checkpoint, f)


class TrainingInterrupted(RuntimeError):
    """SIGTERM stopped training at an optimizer-step boundary after ``checkpoint`` was saved; nothing was exported.

    ``python -m altogether.train`` exits with :data:`altogether.cli.SIGTERM_EXIT_CODE` (143) so that a job script can requeue
    the run with ``resume=auto``.
    """

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped by SIGTERM after optimizer step {step}; checkpoint saved to {checkpoint}; "
                         "run the same command with resume=auto to continue")
        self.step, self.checkpoint = step, checkpoint


class StopOnSigterm(Callback):
    """On SIGTERM (what job schedulers send before a kill), finish the optimizer step in progress, save
    ``path`` and raise :class:`TrainingInterrupted`.

    Lightning's own handler stops after the micro-batch in progress, possibly in the middle of an accumulated
    step, and ends the run as a success (a ``SystemExit`` without code); this one replaces it while training
    runs (Lightning restores the original handler at teardown). All ranks stop at the same step: the request is
    all-reduced once per optimizer step, as Lightning broadcasts its own flag.
    """

    def __init__(self, path: Path):
        self.path, self.requested = path, False

    def on_train_start(self, trainer, pl_module) -> None:
        # on_train_start runs after Trainer._run installed Lightning's SIGTERM handler
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch["micro_index"] != batch["group_size"] - 1:
            return
        stop = self.requested
        if trainer.world_size > 1:
            flag = torch.tensor([int(stop)], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            trainer.save_checkpoint(self.path)
            raise TrainingInterrupted(trainer.global_step, self.path)


def _checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at; raises when the file cannot be read (memory-mapped: cheap)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint in ``folder`` saved at the latest optimizer step among those that load (``last.ckpt`` on a
    tie), or ``None``; each one that cannot be read (half written, not a checkpoint) is logged as skipped."""
    best: tuple[int, bool, Path] | None = None
    for path in sorted(folder.glob("*.ckpt")):
        try:
            step = _checkpoint_step(path)
        except Exception as err:  # truncated zip, foreign pickle, missing key: any reason the file is unusable
            log.warning("resume: skipped %s: it cannot be read as a checkpoint (%s)", path,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            continue
        candidate = (step, path.name == LAST_CHECKPOINT, path)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    return None if best is None else best[2]


def _resume_path(cfg: RecipeConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from: ``resume=auto`` (the newest that loads, or none: a first run), ``true`` (the
    newest that loads, which must exist) or a checkpoint path; ``false`` starts from step 0."""
    mode = str(cfg.resume).lower()  # YAML and key=value give booleans or strings
    if mode in ("false", "none"):
        return None
    folder = run_dir / CHECKPOINT_DIR
    if mode in ("auto", "true"):
        found = newest_checkpoint(folder) if folder.is_dir() else None
        if found is None and mode == "true":
            raise FileNotFoundError(f"resume=true but there is no readable checkpoint in {folder} "
                                    "(resume=auto starts a new run when there is none)")
        log.info("resume=%s: %s", mode, f"resuming from {found}" if found else f"no checkpoint in {folder}, "
                 "starting from step 0")
        return None if found is None else str(found)
    path = Path(str(cfg.resume))
    if not path.is_file():
        raise FileNotFoundError(f"resume: checkpoint not found: {path}")
    try:
        _checkpoint_step(path)
    except Exception as err:
        raise ValueError(f"resume: {path} cannot be read as a checkpoint ({str(err).splitlines()[0]})") from None
    return str(path)


def model_of_init(cfg: RecipeConfig) -> tuple[RecipeConfig, dict[str, Any] | None]:
    """The recipe with the model its ``init_from`` export holds, and that export's encoder source.

    A run that starts from an export trains that export's model (encoder, mapper, decoder architecture), whatever
    the recipe's ``model`` block says; how this run trains comes from the recipe: ``decoder.trainable``,
    ``decoder.lora`` and the images' ``encoder.resize_mode`` (which its export then records), and the ``layout``
    (a warning names a ``prompt_end`` other than the export's). Without ``init_from``: the recipe as it is and no
    encoder source (the encoder's own).
    """
    if not cfg.init_from:
        return cfg, None
    meta = read_export_config(cfg.init_from)
    # The layout is the recipe's, but a decoder trained with a mark after every prompt relies on it: a change is
    # allowed (a user may mean it) and said once, not found later in the captions.
    trained_end = layout_from(meta).prompt_end
    if trained_end != cfg.layout.prompt_end:
        log.warning("init_from %s was trained with layout.prompt_end %r; this recipe sets %r", cfg.init_from,
                    trained_end, cfg.layout.prompt_end)
    model = export_model_config(cfg.init_from, meta)
    model.decoder.trainable, model.decoder.lora = cfg.model.decoder.trainable, cfg.model.decoder.lora
    model.encoder.resize_mode = cfg.model.encoder.resize_mode
    cfg = copy.deepcopy(cfg)
    cfg.model = model
    return cfg, meta.get("encoder_source")


def fit(
    cfg: RecipeConfig,
    *,
    sources: tuple[Sequence[Record] | None, Sequence[Record] | None] | None = None,
    callbacks: Sequence[Callback] = (),
    model_parts: tuple[AltogetherModel, Any, Callable] | None = None,
) -> Path:
    """Train one recipe and write ``<output_dir>/export``; returns the export path.

    ``sources`` overrides the records named by ``cfg.data`` (notebooks, the demo); ``model_parts`` supplies a
    ready (model, tokenizer, transform).
    """
    cfg, encoder_source = model_of_init(cfg)
    run_dir = Path(cfg.output_dir)
    check_run_settings(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    stale = remove_stale_temporaries(run_dir / CHECKPOINT_DIR)
    if stale:
        log.info("removed %d partial checkpoint(s) of an interrupted write: %s", len(stale),
                 ", ".join(p.name for p in stale))
    ckpt_path = _resume_path(cfg, run_dir)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))

    model, tokenizer, transform = model_parts or build_model(cfg)
    # The export will carry cfg.generation: refuse settings its decoder cannot run before training for them.
    captioner = Recaptioner(model, tokenizer, transform, cfg.layout, cfg.generation)
    captioner.check(captioner.generation)
    if cfg.trainer.activation_checkpointing:
        checkpoint_activations(model)
    train_source, val_source = sources if sources is not None else open_sources(cfg)
    cache = None
    if cfg.data.use_cache:
        from .cache_embeddings import CachedSource, EmbeddingCache

        # An init_from export holds its own copy of a local encoder: the cache was made with the original.
        encoder = {**to_container(cfg.model.encoder), **(encoder_source or {}),
                   "resize_mode": cfg.model.encoder.resize_mode}
        cache = EmbeddingCache(cfg.data.cache_dir, expect_encoder=encoder)
        train_source, val_source = (CachedSource(s, cache) if s is not None else None for s in (train_source, val_source))
    accumulate = accumulation_steps(cfg, _world_size(cfg))
    datamodule = CaptionDataModule(cfg, tokenizer, transform, accumulate=accumulate, train_source=train_source,
                                   val_source=val_source, cache=cache)
    module = CaptionerModule(model, cfg)
    if cfg.trainer.compile:
        # In place, and the module hidden_states calls: weight names stay the export's.
        causal_lm(model.decoder).base_model.compile()

    t = cfg.trainer
    sample_records = readable_sample_records(val_source or [], t.num_sample_images)
    all_callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_DIR), every_n_train_steps=t.checkpoint_every_n_steps,
                        save_last=True, save_top_k=-1, filename="step{step:06d}", auto_insert_metric_name=False),
        StopOnSigterm(run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT),
        SampleCaptions(sample_records, tokenizer, transform, cfg, run_dir / "samples.jsonl"),
        # The bar shows the loss, read back from the device: as often as the logs, not after every step.
        *([TQDMProgressBar(refresh_rate=t.log_every_n_steps)] if t.progress_bar else []),
        *callbacks,
    ]
    has_val = bool(val_source)
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(cfg),
        precision=_precision(cfg),
        max_steps=cfg.optim.max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=min(t.val_every_n_steps, cfg.optim.max_steps) * accumulate if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if has_val else 0,
        num_sanity_val_steps=0,
        logger=_loggers(cfg, run_dir),
        callbacks=all_callbacks,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    export = run_dir / "export"
    if trainer.is_global_zero:
        log.info("%s: %d optimizer steps; %d records skipped as unreadable; %d captions truncated to %d tokens",
                 cfg.recipe, trainer.global_step, module.skipped_total, module.truncated_total,
                 cfg.layout.max_caption_tokens)
        save_export(export, module.model, tokenizer, model_cfg=cfg.model, layout=cfg.layout,
                    generation=cfg.generation, recipe=to_container(cfg), encoder_source=encoder_source,
                    extra={"training": {"steps": trainer.global_step, "skipped": module.skipped_total,
                                        "truncated_captions": module.truncated_total}})
    if trainer.world_size > 1:
        trainer.strategy.barrier()
    return export
