"""Export folders: what a training run leaves for inference, and what the Hub stores.

```
export/
  altogether.json      model / layout / generation settings, the decoder's HF config, the resolved recipe
  model.safetensors    trained weights only: mapper.* and decoder.* (the frozen encoder is referenced)
  tokenizer/           the decoder's tokenizer
  encoder/             optional: the frozen encoder in open_clip's local-dir format
```
Loading is strict: a missing or unexpected tensor is an error that names it. Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model
from torch import nn

from .config import EncoderConfig, GenerationSettings, LayoutConfig, ModelConfig
from .model import AltogetherModel

CONFIG_FILE = "altogether.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """An export folder is missing something or does not match its config."""


def _trained_parts(model: AltogetherModel) -> nn.Module:
    return nn.ModuleDict({"mapper": model.mapper, "decoder": model.decoder})


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
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an export folder atomically (built beside the target, then renamed over it).

    ``include_encoder`` copies the frozen encoder too; it is forced for ``local-dir:`` encoders, whose folder
    would not exist on another machine.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model_dict = OmegaConf.to_container(OmegaConf.structured(model_cfg), resolve=True)
        source = dict(model_dict["encoder"])
        if include_encoder or source["name"].startswith("local-dir:"):
            _save_encoder(source, tmp / "encoder")
            model_dict["encoder"] = {"name": "local-dir:encoder", "pretrained": None}
        hf_config = model.decoder.config.to_dict() if hasattr(model.decoder, "config") else None
        meta = {
            "format": "altogether-export",
            "version": FORMAT_VERSION,
            "model": model_dict,
            "encoder_source": source,
            "decoder_hf_config": hf_config,
            "layout": OmegaConf.to_container(OmegaConf.structured(layout), resolve=True),
            "generation": OmegaConf.to_container(OmegaConf.structured(generation), resolve=True),
            "recipe": recipe,
            **(extra or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
        save_model(_trained_parts(model), str(tmp / WEIGHTS_FILE))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _save_encoder(encoder_cfg: dict[str, Any], target: Path) -> None:
    """The frozen encoder as an open_clip local-dir (the full CLIP, so its text tower is kept for scoring)."""
    from .model import create_open_clip, save_open_clip_dir

    name = encoder_cfg["name"]
    target.mkdir(parents=True)
    if name.startswith("local-dir:"):
        source = Path(name[len("local-dir:") :])
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, target / item.name)
        return
    import open_clip

    clip, _ = create_open_clip(EncoderConfig(**{k: encoder_cfg[k] for k in ("name", "pretrained")}))
    preprocess = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    save_open_clip_dir(target, clip.state_dict(), open_clip.get_model_config(name), preprocess)


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
        raise ExportError(f"{path}: unsupported export format {meta.get('format')!r} v{meta.get('version')!r}")
    return meta


def export_model_config(directory: str | Path, meta: dict[str, Any]) -> ModelConfig:
    """The export's model config with the decoder rebuilt from its stored HF config (no hub access)."""
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
    if cfg.encoder.name == "local-dir:encoder":
        cfg.encoder.name = f"local-dir:{Path(directory).resolve() / 'encoder'}"
    if meta.get("decoder_hf_config"):
        cfg.decoder.config = {k: v for k, v in meta["decoder_hf_config"].items() if _plain(v)}
    cfg.decoder.tokenizer = str(Path(directory) / "tokenizer")
    return cfg  # type: ignore[return-value]


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def load_export(
    directory: str | Path, *, device: str | torch.device = "cpu", with_encoder: bool = True
) -> tuple[AltogetherModel, Any, Callable | None, dict[str, Any]]:
    """(model, tokenizer, image transform, export config) from an export folder, strictly."""
    from .model import load_tokenizer

    directory = Path(directory)
    meta = read_export_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{directory}: {WEIGHTS_FILE} is missing")
    cfg = export_model_config(directory, meta)
    tokenizer = load_tokenizer(cfg.decoder)
    model, preprocess = AltogetherModel.from_config(cfg, tokenizer, device=device, with_encoder=with_encoder)
    try:
        load_model(_trained_parts(model), str(weights), strict=True, device=str(device))
    except RuntimeError as err:
        raise ExportError(f"{weights} does not match its config: {err}") from None
    return model.eval(), tokenizer, preprocess, meta


def layout_from(meta: dict[str, Any]) -> LayoutConfig:
    return OmegaConf.merge(OmegaConf.structured(LayoutConfig), meta["layout"])  # type: ignore[return-value]


def generation_from(meta: dict[str, Any]) -> GenerationSettings:
    return OmegaConf.merge(OmegaConf.structured(GenerationSettings), meta["generation"])  # type: ignore[return-value]
