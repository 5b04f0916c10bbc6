"""Recipe schemas, loading a recipe by name, and ``key=value`` overrides.

A recipe is a YAML file in ``recipes/`` validated against :class:`RecipeConfig`. Unknown keys and wrong types
fail with the full key named; values that are individually valid but inconsistent (a warm-up longer than the
run, a global batch that micro-batches cannot reach) fail in :func:`validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data.records import ALT_KEY, IMAGE_KEY
from .generation import GenerationConfig, GenerationError

# Recipes live in the repository's top-level recipes/ and are packaged as altogether/recipes in the wheel.
_PACKAGE = Path(__file__).resolve().parent
RECIPE_DIR = next((p for p in (_PACKAGE / "recipes", _PACKAGE.parent / "recipes") if p.is_dir()), _PACKAGE / "recipes")


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message names the key and what is wrong."""


@dataclass
class EncoderConfig:
    """Frozen open_clip image encoder.

    ``name`` is an open_clip model name (``ViT-H-14-quickgelu``) or ``local-dir:/path`` (open_clip's own folder
    format: ``open_clip_config.json`` + weights). ``pretrained`` is an open_clip tag (``metaclip_fullcc``) or a
    local checkpoint file; ``None`` means random weights (tests, benchmarks).

    ``resize_mode``: how an image becomes the encoder's square input, the same for training, inference and the
    embedding cache, and stored in exports and caches. ``squash`` resizes both sides (the whole image, its aspect
    changed; the default: captions describe the whole image, see docs/recipes.md), ``pad`` fits the long side
    and pads to square with white, ``crop`` fits the short side and centre-crops (open_clip's evaluation
    transform). Exports and caches written before the setting existed were made with ``crop``
    (:data:`LEGACY_RESIZE_MODE`) and load with it.
    """

    name: str = "ViT-H-14-quickgelu"
    pretrained: Optional[str] = "metaclip_fullcc"
    resize_mode: str = "squash"  # squash | pad | crop


LEGACY_RESIZE_MODE = "crop"  # open_clip's evaluation transform, which every encoder used before resize_mode


@dataclass
class MapperConfig:
    """ClipCap's transformer mapper (:class:`altogether.model.Mapper`): image embedding -> ``num_visual_tokens``
    decoder-space tokens. Defaults are ClipCap's: 40 tokens, 8 pre-norm layers, 8 heads, MLP ratio 2 (ReLU)."""

    num_visual_tokens: int = 40
    num_layers: int = 8
    num_heads: int = 8
    mlp_ratio: float = 2.0
    dropout: float = 0.0


@dataclass
class LoraSettings:
    """LoRA adapter on the decoder (used when ``decoder.trainable=lora``)."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # OPT's attention and MLP projections; other decoders name theirs differently.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])


@dataclass
class DecoderConfig:
    """Hugging Face causal LM.

    ``name_or_path`` loads pretrained weights (hub id or local folder). When ``config`` is given the decoder is
    instead built with random weights from that Hugging Face config dict (it must hold ``model_type``);
    ``tokenizer`` then names the tokenizer folder (default: ``name_or_path``).
    """

    name_or_path: str = "facebook/opt-1.3b"
    config: Optional[dict[str, Any]] = None
    tokenizer: Optional[str] = None
    trainable: str = "full"  # full | lora | frozen
    lora: LoraSettings = field(default_factory=LoraSettings)
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class LayoutConfig:
    """The token layout ``[visual][alt-text <= max_alt_tokens][prompt_end][caption + EOS <= max_caption_tokens]``.

    ``alt_separator`` joins several alt-texts into one prompt. ``prompt_end`` is text placed after the prompt in
    every sample, in training and generation, also when the alt-text is dropped: it marks where the caption begins
    (a decoder trained from scratch copies sooner with it: docs/demo.md). Its tokens are never truncated and
    never in the loss; "" (the full-size recipes') places nothing.
    """

    max_alt_tokens: int = 128
    max_caption_tokens: int = 256
    prompt_dropout: float = 0.5
    alt_separator: str = "; "
    prompt_end: str = ""


@dataclass
class DataConfig:
    """Where records come from and which fields are prompt and target.

    ``format``: ``auto`` (from the file name), ``annotations`` (Altogether-FT ``{"data": [...]}`` JSON), ``jsonl``,
    ``parquet`` or ``webdataset`` (tar shards, brace patterns allowed).
    ``task``: ``pretrain`` (target = the longest alt-text) or ``finetune`` (target = ``target_key``).
    ``alt_text_sources``: which ``[source, text]`` pairs of MetaCLIP's ``texts`` count as alt-texts (e.g.
    ``[alt]``); ``null`` keeps them all. ``max_skipped_fraction``: the run stops with an error once more than this
    fraction of the samples read so far could not be used (and whenever a whole optimizer step could not read
    one): a wrong ``image_root`` or column name must not train on nothing.
    """

    format: str = "auto"
    train: Optional[str] = None
    val: Optional[str] = None
    task: str = "finetune"
    target_key: str = "round3"
    alt_key: str = ALT_KEY
    image_key: str = IMAGE_KEY
    image_root: Optional[str] = None
    alt_text_sources: Optional[List[str]] = None
    max_skipped_fraction: float = 0.5
    val_fraction: float = 0.0
    micro_batch_size: int = 8
    # Several samples per row (block-diagonal attention) instead of one padded row each; pack_tokens caps a row.
    packing: bool = False
    pack_tokens: int = 1024
    num_workers: int = 2
    # Train from cached image embeddings (python -m altogether.cache_embeddings) instead of images.
    use_cache: bool = False
    cache_dir: Optional[str] = None
    shuffle_buffer: int = 1000


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``, counted in optimizer steps."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2000
    max_steps: int = 44000
    global_batch_size: int = 512
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto (DDP when several devices) | ddp | fsdp
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    seed: int = 0
    log_every_n_steps: int = 10
    val_every_n_steps: int = 500
    checkpoint_every_n_steps: int = 1000
    sample_every_n_steps: int = 500
    num_sample_images: int = 4
    logger: str = "csv"  # csv | tensorboard | wandb
    progress_bar: bool = True
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class RecipeConfig:
    recipe: str = MISSING
    description: str = ""
    output_dir: str = "runs/${recipe}"
    init_from: Optional[str] = None  # export folder of an earlier stage (finetune starts from pretrain)
    # false | auto (the newest readable checkpoint of output_dir, or a new run when there is none) | true (the same,
    # but one must exist) | a checkpoint path
    resume: Any = False
    dry_run: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # what the export stores
    # A plug-in that runs this recipe instead of one `fit` (several stages, say); set in the recipe file only.
    pipeline: Optional[str] = None


class Pipeline(NamedTuple):
    """What an ``altogether.pipelines`` plug-in (:mod:`altogether.plugins`) provides.

    ``schema``: the recipe schema, :class:`RecipeConfig` or a dataclass extending it with the pipeline's own
    settings (the recipe file's extra blocks). ``run(cfg) -> int``: runs the loaded recipe, returns the exit code.
    """

    schema: type
    run: Callable[[Any], int]


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``altogether/recipes``."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str, overrides: list[str] | dict[str, Any] | None = None) -> RecipeConfig:
    """Load a recipe by name (or YAML path), apply ``key=value`` overrides and validate.

    Returns a typed :class:`RecipeConfig` (a DictConfig backed by the schema, so attribute access is checked).
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}; valid recipes: {', '.join(available_recipes())}")
    try:
        recipe = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(recipe, DictConfig):
        raise ConfigError(f"recipe {path}: expected a mapping of keys (recipe:, optim:, ...), "
                          f"got a {type(recipe).__name__.replace('Config', '').lower()}")
    if not recipe:  # an empty file loads as {}: the defaults alone would fetch facebook/opt-1.3b and train on nothing
        raise ConfigError(f"recipe {path}: empty; a recipe sets at least its data and model "
                          f"(start from one of {RECIPE_DIR})")
    pipeline = recipe.get("pipeline")
    schema = RecipeConfig if pipeline is None else recipe_pipeline(pipeline).schema
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), recipe)
        if "recipe" not in recipe:
            cfg.recipe = path.stem
        if overrides:
            extra = OmegaConf.from_dotlist(list(overrides)) if isinstance(overrides, list) else OmegaConf.create(overrides)
            cfg = OmegaConf.merge(cfg, extra)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, path)) from None
    if cfg.pipeline != pipeline:
        raise ConfigError(f"key 'pipeline': set by the recipe file ({pipeline!r}), not by an override")
    validate(cfg)
    return cfg  # type: ignore[return-value]


def recipe_pipeline(name: str) -> Pipeline:
    """The installed pipeline plug-in ``name``; :class:`ConfigError` when there is none of that name."""
    from .plugins import PIPELINES, UnknownPlugin, load_plugin

    try:
        return load_plugin(PIPELINES, name)
    except UnknownPlugin as err:
        raise ConfigError(f"key 'pipeline': {err}") from None


def _describe(err: OmegaConfBaseException, path: Path) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    where = f"key {key!r}" if key else f"recipe {path.name}"
    return f"{where}: {msg}"


_CHOICES = {
    "model.encoder.resize_mode": ("squash", "pad", "crop"),
    "model.decoder.trainable": ("full", "lora", "frozen"),
    "model.decoder.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "data.format": ("auto", "annotations", "jsonl", "parquet", "webdataset"),
    "data.task": ("pretrain", "finetune"),
    "trainer.strategy": ("auto", "ddp", "fsdp"),
    "trainer.logger": ("csv", "tensorboard", "wandb"),
}


# Counts and intervals that 0 or less would divide by zero or never reach.
_POSITIVE = ("data.micro_batch_size", "optim.global_batch_size", "optim.max_steps", "trainer.log_every_n_steps",
             "trainer.val_every_n_steps", "trainer.checkpoint_every_n_steps", "trainer.sample_every_n_steps",
             "trainer.num_nodes")


def validate(cfg: DictConfig | RecipeConfig) -> None:
    """Cross-field checks the schema cannot express; raises :class:`ConfigError` naming the key."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"key {key!r}: {value!r} is not one of {', '.join(choices)}")
    for key in ("trainer.precision", "trainer.accelerator"):
        value = OmegaConf.select(cfg, key)
        if value != "auto" and value not in (choices := lightning_choices(key)):  # "auto": ours, no import
            raise ConfigError(f"key {key!r}: {value!r} is not one of auto, {', '.join(choices)}")
    o, lay, d = cfg.optim, cfg.layout, cfg.data
    for key in _POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"key {key!r}: {OmegaConf.select(cfg, key)} must be >= 1")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"key 'optim.betas': {list(o.betas)} must be two numbers in [0, 1) (AdamW's beta1, beta2)")
    if not 0.0 <= lay.prompt_dropout <= 1.0:
        raise ConfigError(f"key 'layout.prompt_dropout': {lay.prompt_dropout} is not in [0, 1]")
    if lay.max_caption_tokens < 1:
        raise ConfigError(f"key 'layout.max_caption_tokens': {lay.max_caption_tokens} must be >= 1")
    if lay.max_alt_tokens < 0:
        raise ConfigError(f"key 'layout.max_alt_tokens': {lay.max_alt_tokens} must be >= 0")
    if not o.lr > 0:
        raise ConfigError(f"key 'optim.lr': {o.lr} must be > 0")
    if not o.weight_decay >= 0:
        raise ConfigError(f"key 'optim.weight_decay': {o.weight_decay} must be >= 0")
    if d.num_workers < 0:
        raise ConfigError(f"key 'data.num_workers': {d.num_workers} must be >= 0")
    devices = cfg.trainer.devices
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise ConfigError(f"key 'trainer.devices': {devices} must be a count >= 1, -1 (all), 'auto' or a list of ids")
    if not 0 <= o.warmup_steps < o.max_steps:
        raise ConfigError(
            f"key 'optim.warmup_steps': {o.warmup_steps} must be in [0, optim.max_steps={o.max_steps}); "
            "a warm-up as long as the run never reaches the learning rate"
        )
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"key 'optim.min_lr_ratio': {o.min_lr_ratio} is not in [0, 1]")
    if o.global_batch_size % d.micro_batch_size:
        raise ConfigError(
            f"key 'optim.global_batch_size': {o.global_batch_size} is not a multiple of "
            f"data.micro_batch_size={d.micro_batch_size}"
        )
    if not 0.0 <= d.max_skipped_fraction <= 1.0:
        raise ConfigError(f"key 'data.max_skipped_fraction': {d.max_skipped_fraction} is not in [0, 1]")
    check_alt_text_sources(d.alt_text_sources, "data.alt_text_sources")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"key 'data.val_fraction': {d.val_fraction} is not in [0, 1)")
    if d.use_cache and not d.cache_dir:
        raise ConfigError("key 'data.cache_dir': data.use_cache=true needs the cache folder")
    if cfg.model.mapper.num_visual_tokens < 1:
        raise ConfigError("key 'model.mapper.num_visual_tokens' must be >= 1")
    try:
        GenerationConfig.from_dict(cfg.generation)
    except GenerationError as err:
        raise ConfigError(f"key 'generation.{err.key}': {err}") from None


def lightning_choices(key: str) -> tuple[str, ...]:
    """What the installed Lightning's ``Trainer`` accepts for ``trainer.precision`` or ``trainer.accelerator``,
    so that a value Lightning would refuse is refused here, by key, before any model loads.

    Precision: the literals ``Trainer.__init__`` is annotated with (``"bf16-mixed"``, ``"32"``, ...; 64 / 32 / 16
    as strings, which is how a recipe or override gives them). Accelerator: the names in Lightning's
    ``AcceleratorRegistry`` plus ``gpu``, which Lightning's ``_AcceleratorConnector`` accepts besides them (it maps
    it to cuda or mps). Imports Lightning (seconds), so :func:`validate` asks only for values other than ``auto``.
    """
    if key == "trainer.accelerator":
        from lightning.pytorch.accelerators import AcceleratorRegistry

        return tuple(sorted(AcceleratorRegistry.available_accelerators())) + ("gpu",)
    import typing

    from lightning.pytorch import Trainer

    def literals(hint: Any) -> list[str]:
        if typing.get_origin(hint) is typing.Literal:
            return [str(value) for value in typing.get_args(hint)]
        return [value for inner in typing.get_args(hint) for value in literals(inner)]

    return tuple(dict.fromkeys(literals(typing.get_type_hints(Trainer.__init__)["precision"])))


def check_alt_text_sources(sources: Optional[List[str]], key: str) -> None:
    """An ``alt_text_sources`` setting is ``None`` (all sources) or a non-empty list of source names."""
    if sources is not None and (not sources or not all(sources)):
        raise ConfigError(f"key {key!r}: give the source types that count as alt-text (e.g. [alt]) or null for all; "
                          "an empty list or name would keep no alt-text")


def accumulation_steps(cfg: RecipeConfig, world_size: int) -> int:
    """Micro-batches per optimizer step so that ``micro * world * steps == global`` exactly."""
    per_step = cfg.data.micro_batch_size * world_size
    steps = cfg.optim.global_batch_size / per_step
    if steps < 1 or not math.isclose(steps, round(steps)):
        raise ConfigError(
            f"key 'optim.global_batch_size': {cfg.optim.global_batch_size} cannot be reached with "
            f"data.micro_batch_size={cfg.data.micro_batch_size} on {world_size} device(s)"
        )
    return round(steps)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what ``dry_run=true`` prints and every run saves)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (safe to store in checkpoints and JSON)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
