"""Export folders: what a training run leaves for inference, and what the Hub stores.

```
export/
  altogether.json      model / layout / generation settings, the decoder's HF config, the resolved recipe,
                       the encoder's source, and a "lora" entry when the decoder carries an adapter
  model.safetensors    trained weights: mapper.* and decoder.* (decoder.* in the decoder's own naming; left
                       out for a LoRA export whose base decoder is referenced, see below)
  tokenizer/           the decoder's tokenizer
  encoder/             the frozen encoder in open_clip's local-dir format, when included (see below)
  adapter/             LoRA exports only: adapter_config.json + adapter_model.safetensors (peft's format)
```

Encoder: referenced by its open_clip name + pretrained tag (or ``hf-hub:`` name), not copied, unless
``include_encoder=True`` or the reference would not load on another machine (a ``local-dir:`` folder, a
local checkpoint file, random weights); then ``encoder/`` holds it and ``model.encoder`` says
``local-dir:encoder``. ``encoder_source`` always records where the encoder originally came from.
``model.encoder.resize_mode`` is the resize policy the model was trained with; loading uses it (an export
without it was made before the setting existed, with ``crop``: :data:`~altogether.config.LEGACY_RESIZE_MODE`).

LoRA: the adapter is stored in ``adapter/``. The base decoder under it is referenced (``lora.base_decoder``
names the Hugging Face Hub id) when its weights are exactly the pretrained ones loaded from that id;
otherwise (a decoder built from a random config, a base fine-tuned in an earlier stage, a local folder)
``lora.base_decoder`` is null and the base weights are in ``model.safetensors``. Loading applies the
adapter; ``merge_lora=True`` merges it into the decoder weights.

Loading is strict: a missing or unexpected tensor is an error that names it. Only safetensors and JSON are read.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from .config import LEGACY_RESIZE_MODE, EncoderConfig, LayoutConfig, ModelConfig
from .generation import GenerationConfig, max_positions
from .io import replacing_dir
from .model import AltogetherModel, causal_lm

CONFIG_FILE = "altogether.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ENCODER_DIR = "encoder"
ENCODER_WEIGHTS = "open_clip_model.safetensors"  # in ENCODER_DIR, as open_clip's local-dir: folders name it
FORMAT_VERSION = 2  # 2: ClipCap's exact mapper (v1's had GELU, q/k/v biases and other tensor names)
# The top-level entries of altogether.json: those save_export writes itself, then those it takes from ``extra``
# ("training": the run's step, skip and truncation counts). A loader refuses any other by name, as it does unknown
# model.* and layout.* keys: it cannot tell a newer version's metadata from a setting that changes the model.
WRITTEN_KEYS = ("format", "version", "model", "encoder_source", "decoder_hf_config", "lora", "layout", "generation",
                "recipe")
EXTRA_KEYS = ("training",)


class ExportError(ValueError):
    """An export folder is missing something or does not match its config."""


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def is_lora(decoder: nn.Module) -> bool:
    """Whether the decoder is wrapped by a peft adapter."""
    return hasattr(decoder, "peft_config")


def encoder_is_portable(encoder: dict[str, Any]) -> bool:
    """Whether an encoder reference loads on another machine: an ``hf-hub:`` name or a known open_clip tag."""
    import open_clip

    name, tag = encoder["name"], encoder.get("pretrained")
    if name.startswith("hf-hub:"):
        return True
    if name.startswith("local-dir:") or not tag:
        return False
    return bool(open_clip.get_pretrained_cfg(name, tag))


def lora_base_reference(decoder: nn.Module) -> str | None:
    """The Hub id the LoRA base decoder was loaded from unchanged, or ``None`` when its weights must be stored.

    Hugging Face records ``name_or_path`` on ``from_pretrained`` only (a decoder built from a config has "", and
    :func:`merge_adapter` clears it); a local folder is not portable, so its weights are stored.
    """
    name = getattr(causal_lm(decoder), "name_or_path", "") or ""
    return name if name and not Path(name).expanduser().exists() else None


def trained_state(model: AltogetherModel, *, with_decoder: bool = True) -> dict[str, torch.Tensor]:
    """``mapper.*`` and ``decoder.*`` tensors in the decoder's own naming (a LoRA wrapper's base, without it)."""
    state = {f"mapper.{k}": v for k, v in model.mapper.state_dict().items()}
    if with_decoder:
        state.update((f"decoder.{k}", v) for k, v in _plain_decoder_state(model.decoder))
    return state


def _plain_decoder_state(decoder: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # peft keeps the wrapped layer as `<name>.base_layer` next to its `<name>.lora_*` tensors.
    for key, value in causal_lm(decoder).state_dict().items():
        if is_lora(decoder):
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
        yield key, value


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses shared storage: a tied tensor (embeddings / LM head) is written once."""
    seen: set[tuple] = set()
    unique = {}
    for name in sorted(state):
        t = state[name]
        identity = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if identity not in seen:
            seen.add(identity)
            unique[name] = t.detach().contiguous()
    save_file(unique, str(path))


def save_export(
    directory: str | Path,
    model: AltogetherModel,
    tokenizer,
    *,
    model_cfg: Any,
    layout: Any,
    generation: Any,
    recipe: dict[str, Any] | None = None,
    include_encoder: bool = False,
    encoder_source: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an export folder atomically (built beside the target, then renamed over it).

    ``model_cfg.encoder`` says where the encoder loads from now; ``encoder_source`` is where it originally came
    from (default: the same), which is what a reference points to. ``include_encoder`` copies the encoder,
    which is forced when the reference is not portable (see the module docstring).
    """
    directory = Path(directory)
    unknown = sorted(set(extra or ()) - set(EXTRA_KEYS))
    if unknown:
        raise ValueError(f"extra: {', '.join(unknown)} would make an export no loader reads; "
                         f"altogether.json's extra entries are {', '.join(EXTRA_KEYS)}")
    with replacing_dir(directory) as tmp:
        model_dict = OmegaConf.to_container(OmegaConf.structured(model_cfg), resolve=True)
        loadable = dict(model_dict["encoder"])
        resize_mode = loadable.pop("resize_mode")
        source = dict(encoder_source or loadable)
        if include_encoder or not encoder_is_portable(source):
            _save_encoder(loadable, tmp / ENCODER_DIR)
            model_dict["encoder"] = {"name": f"local-dir:{ENCODER_DIR}", "pretrained": None}
        else:
            model_dict["encoder"] = dict(source)
        model_dict["encoder"]["resize_mode"] = resize_mode
        hf_config = causal_lm(model.decoder).config
        lora = None
        if is_lora(model.decoder):
            lora = {"adapter": ADAPTER_DIR, "base_decoder": lora_base_reference(model.decoder)}
            _save_adapter(model.decoder, tmp / ADAPTER_DIR)
        meta = {
            "format": "altogether-export",
            "version": FORMAT_VERSION,
            "model": model_dict,
            "encoder_source": source,
            # The decoder's own vocabulary size always (it may exceed the tokenizer's, as OPT-1.3B's does).
            "decoder_hf_config": {**hf_config.to_diff_dict(), "vocab_size": hf_config.vocab_size},
            "lora": lora,
            "layout": OmegaConf.to_container(OmegaConf.structured(layout), resolve=True),
            "generation": GenerationConfig.from_dict(generation).to_dict(),
            "recipe": recipe,
            **(extra or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
        base_referenced = bool(lora and lora["base_decoder"])
        _save_tensors(trained_state(model, with_decoder=not base_referenced), tmp / WEIGHTS_FILE)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return directory


def _save_adapter(decoder: nn.Module, target: Path) -> None:
    """The adapter in peft's own format (``PeftModel.from_pretrained`` can read it too)."""
    from peft import get_peft_model_state_dict

    target.mkdir(parents=True)
    decoder.peft_config["default"].save_pretrained(str(target))
    # Embedding layers are never resized here; "auto" would look the base config up on the Hub to check.
    tensors = get_peft_model_state_dict(decoder, save_embedding_layers=False)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(target / ADAPTER_WEIGHTS))


def _save_encoder(encoder_cfg: dict[str, Any], target: Path) -> None:
    """The frozen encoder as an open_clip local-dir (the full CLIP, so its text tower is kept for scoring)."""
    from .model import create_open_clip, save_open_clip_dir

    name = encoder_cfg["name"]
    target.mkdir(parents=True)
    if name.startswith("local-dir:"):
        source = Path(name[len("local-dir:") :])
        if not source.is_dir():
            raise ExportError(f"encoder folder {source} does not exist, so it cannot be copied into the export")
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, target / item.name)
        return
    import open_clip

    clip, _ = create_open_clip(EncoderConfig(name=name, pretrained=encoder_cfg.get("pretrained")))
    preprocess = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ExportError(f"open_clip has no config for {name!r}; it cannot be written as a local-dir encoder")
    save_open_clip_dir(target, clip.state_dict(), model_cfg, preprocess)


def copy_export(source: str | Path, target: str | Path, *, include_encoder: bool = False) -> Path:
    """Copy an export folder (atomically); ``include_encoder`` adds ``encoder/`` when it only had a reference."""
    source, target = Path(source), Path(target)
    meta = read_export_config(source)
    with replacing_dir(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if include_encoder and not (tmp / ENCODER_DIR).is_dir():
            _save_encoder(meta["encoder_source"], tmp / ENCODER_DIR)
            meta["model"]["encoder"].update(name=f"local-dir:{ENCODER_DIR}", pretrained=None)
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return target


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def read_export_config(directory: str | Path) -> dict[str, Any]:
    """The export's ``altogether.json``, checked for format and version."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{directory} is not an altogether export: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: invalid JSON: {err}") from None
    if meta.get("format") != "altogether-export" or meta.get("version") != FORMAT_VERSION:
        raise ExportError(f"{path}: unsupported export format {meta.get('format')!r} v{meta.get('version')!r}; "
                          f"this altogether reads 'altogether-export' v{FORMAT_VERSION}")
    unknown = [key for key in meta if key not in WRITTEN_KEYS + EXTRA_KEYS] + _unknown_keys(
        ModelConfig, meta.get("model"), "model.") + _unknown_keys(LayoutConfig, meta.get("layout"), "layout.")
    if unknown:
        raise ExportError(f"{path}: settings this altogether does not know: {', '.join(unknown)} (written by a newer "
                          "version? upgrade altogether to load it)")
    return meta


def _unknown_keys(schema: Any, values: Any, prefix: str) -> list[str]:
    """Keys of ``values`` (nested dicts) that the config dataclass ``schema`` has no field for, as dotted names."""
    if not (dataclasses.is_dataclass(schema) and isinstance(values, dict)):
        return []
    types = typing.get_type_hints(schema)
    unknown = []
    for key, value in values.items():
        if key in types:
            unknown += _unknown_keys(types[key], value, f"{prefix}{key}.")
        else:
            unknown.append(f"{prefix}{key}")
    return unknown


@contextmanager
def _readable(path: Path | str) -> Iterator[None]:
    """Turn safetensors' error for a damaged file (a copy or download cut short) into one naming ``path``."""
    try:
        yield
    except SafetensorError as err:
        raise ExportError(f"{path}: damaged or truncated safetensors file ({err}); copy or download it again"
                          ) from None


def export_model_config(directory: str | Path, meta: dict[str, Any], *, base_decoder: str | None = None) -> ModelConfig:
    """The export's model config, resolved to load from the folder.

    The decoder is rebuilt from its stored HF config (no hub access), except under a LoRA adapter whose base is
    referenced: that base loads from the Hub id, or from ``base_decoder`` (e.g. a local copy) when given.
    """
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
    if "resize_mode" not in meta["model"]["encoder"]:
        cfg.encoder.resize_mode = LEGACY_RESIZE_MODE
    if cfg.encoder.name == f"local-dir:{ENCODER_DIR}":
        cfg.encoder.name = f"local-dir:{Path(directory).resolve() / ENCODER_DIR}"
    reference = (meta.get("lora") or {}).get("base_decoder")
    if reference:
        cfg.decoder.name_or_path = base_decoder or reference
        cfg.decoder.config = None
    elif meta.get("decoder_hf_config"):
        cfg.decoder.config = {k: v for k, v in meta["decoder_hf_config"].items() if _plain(v)}
    cfg.decoder.tokenizer = str(Path(directory) / "tokenizer")
    return cfg  # type: ignore[return-value]


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def load_export(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    with_encoder: bool = True,
    merge_lora: bool = False,
    base_decoder: str | None = None,
    attn_implementation: str | None = None,
    dtype: torch.dtype = torch.float32,
    resize_mode: str | None = None,
) -> tuple[AltogetherModel, Any, Callable | None, dict[str, Any]]:
    """(model, tokenizer, image transform, export config) from an export folder, strictly.

    ``merge_lora`` merges a LoRA adapter into the decoder weights (faster inference, no peft wrapper);
    ``base_decoder`` overrides where a referenced LoRA base decoder loads from; ``attn_implementation``
    overrides the one the export was trained with (``auto`` picks what this machine has); ``resize_mode``
    overrides the export's resize policy (training that starts from an export uses its recipe's). ``dtype``: the
    mapper's and decoder's (float32, as training needs, unless asked).
    """
    from .model import load_tokenizer

    directory = Path(directory)
    meta = read_export_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{directory}: {WEIGHTS_FILE} is missing")
    cfg = export_model_config(directory, meta, base_decoder=base_decoder)
    if attn_implementation is not None:
        cfg.decoder.attn_implementation = attn_implementation
    if resize_mode is not None:
        cfg.encoder.resize_mode = resize_mode
    tokenizer = load_tokenizer(cfg.decoder)
    own = cfg.encoder.name == f"local-dir:{directory.resolve() / ENCODER_DIR}"
    encoder = directory / ENCODER_DIR / ENCODER_WEIGHTS if own else f"{cfg.encoder.name} ({cfg.encoder.pretrained})"
    with _readable(encoder):
        model, preprocess = AltogetherModel.from_config(cfg, tokenizer, device=device, with_encoder=with_encoder,
                                                        dtype=dtype)
    lora = meta.get("lora")
    parts = {"mapper": model.mapper}
    if not (lora and lora.get("base_decoder")):
        parts["decoder"] = model.decoder
    try:
        with _readable(weights):
            load_model(nn.ModuleDict(parts), str(weights), strict=True, device=str(device))
    except RuntimeError as err:
        raise ExportError(f"{weights} does not match its config: {err}") from None
    if lora:
        if base_decoder and lora.get("base_decoder"):
            # A local copy of the referenced base: it still is that base, and a re-save should say so.
            _set_name_or_path(model.decoder, lora["base_decoder"])
        model.decoder = apply_adapter(model.decoder, directory / lora.get("adapter", ADAPTER_DIR), device=device)
        if merge_lora:
            model.decoder = merge_adapter(model.decoder)
    return model.eval(), tokenizer, preprocess, meta


def apply_adapter(decoder: nn.Module, adapter_dir: Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Wrap ``decoder`` with the LoRA adapter saved in ``adapter_dir``; every adapter tensor must match."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not (adapter_dir / "adapter_config.json").is_file() or not weights.is_file():
        raise ExportError(f"{adapter_dir}: the LoRA adapter (adapter_config.json + {ADAPTER_WEIGHTS}) is missing")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    wrapped = get_peft_model(decoder, config)
    try:
        result = set_peft_model_state_dict(wrapped, load_file(str(weights), device=str(device)))
    except RuntimeError as err:
        raise ExportError(f"{weights} does not match its adapter config: {err}") from None
    missing = sorted(k for k in result.missing_keys if ".lora_" in k)
    if missing or result.unexpected_keys:
        raise ExportError(
            f"{weights} does not match its adapter config: missing {', '.join(missing) or 'none'}; "
            f"unexpected {', '.join(sorted(result.unexpected_keys)) or 'none'}"
        )
    return wrapped


def merge_adapter(decoder: nn.Module) -> nn.Module:
    """Merge a LoRA adapter into the decoder weights and drop the wrapper.

    The merged weights are no longer the pretrained ones ``name_or_path`` names, so that is cleared: a later
    export stores them instead of referencing the original.
    """
    merged = decoder.merge_and_unload()
    _set_name_or_path(merged, "")
    return merged


def _set_name_or_path(decoder: nn.Module, name: str) -> None:
    decoder.name_or_path = name
    decoder.config.name_or_path = name


def layout_from(meta: dict[str, Any]) -> LayoutConfig:
    return OmegaConf.merge(OmegaConf.structured(LayoutConfig), meta["layout"])  # type: ignore[return-value]


def generation_from(meta: dict[str, Any]) -> GenerationConfig:
    """The export's generation defaults, validated. Exports of earlier versions stored fewer settings: the
    others take :class:`~altogether.generation.GenerationConfig`'s neutral defaults, as they did then."""
    try:
        return GenerationConfig.from_dict(meta["generation"])
    except (TypeError, ValueError) as err:
        raise ExportError(f"{CONFIG_FILE}: 'generation': {err}") from None


def decoder_max_positions(meta: dict[str, Any]) -> int | None:
    """The decoder's position table length from the export's stored Hugging Face config, without loading it."""
    from transformers import AutoConfig

    hf_config = dict(meta.get("decoder_hf_config") or {})
    model_type = hf_config.pop("model_type", None)
    if model_type is None:
        return None
    return max_positions(AutoConfig.for_model(model_type, **hf_config))
