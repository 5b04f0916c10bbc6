"""Tiny stand-ins built from configs with random weights, for tests, benchmarks and CPU smoke runs.

The architecture is the real one (open_clip ViT, ClipCap mapper, OPT decoder); only the sizes are small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from .model import save_open_clip_dir
from .tokenizer import train_tokenizer

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
CLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def tiny_opt_config(hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 512) -> dict[str, Any]:
    """A small OPT config (``model_type`` included) for ``model.decoder.config``."""
    return {"model_type": "opt", "hidden_size": hidden, "num_hidden_layers": layers, "ffn_dim": 4 * hidden,
            "num_attention_heads": heads, "max_position_embeddings": max_positions, "word_embed_proj_dim": hidden,
            "do_layer_norm_before": True, "dropout": 0.0, "attention_dropout": 0.0}


def write_tiny_clip(directory: str | Path, *, seed: int = 0, model_cfg: dict[str, Any] | None = None) -> Path:
    """An open_clip local-dir with seeded random weights (the same folder loads to the same encoder)."""
    import open_clip

    model_cfg = model_cfg or TINY_CLIP
    torch.manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_open_clip_dir(directory, None, model_cfg, CLIP_PREPROCESS)  # config first: create_model reads it
    model = open_clip.create_model(f"local-dir:{directory}", pretrained=None)
    return save_open_clip_dir(directory, model.state_dict(), model_cfg, CLIP_PREPROCESS)


def write_tokenizer(directory: str | Path, texts: Iterable[str], vocab_size: int = 400) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a Hugging Face tokenizer folder."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def tiny_model_overrides(encoder_dir: str | Path, tokenizer_dir: str | Path, *, visual_tokens: int = 4) -> dict[str, Any]:
    """Recipe overrides that swap the full-size model for tiny random ones."""
    return {
        "model": {
            "encoder": {"name": f"local-dir:{encoder_dir}", "pretrained": None},
            "mapper": {"num_visual_tokens": visual_tokens, "num_layers": 1, "num_heads": 2},
            "decoder": {"config": tiny_opt_config(), "tokenizer": str(tokenizer_dir)},
        }
    }


def favour_token(decoder: torch.nn.Module, token_id: int, logit_shift: float) -> None:
    """Raise ``token_id``'s logit by ``logit_shift`` at every position of a random OPT decoder, in place.

    Moves the final layer norm's bias along the token's output embedding. With the EOS token this makes a
    random decoder end its captions at varied lengths, as a trained one does (tests and benchmarks of decoding).
    """
    lm = decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
    norm = getattr(getattr(lm, "model", None), "decoder", None)
    if norm is None or getattr(norm, "final_layer_norm", None) is None or norm.project_out is not None:
        raise ValueError("favour_token needs an OPT decoder with a final layer norm and no output projection")
    weight = lm.get_output_embeddings().weight
    with torch.no_grad():
        if not weight[token_id].any():  # OPT zeroes the row of its config's pad id at init: give it a direction
            seeded = torch.Generator().manual_seed(token_id)
            weight[token_id] = torch.randn(weight.shape[1], generator=seeded).to(weight) * weight.std()
        direction = weight[token_id]
        norm.final_layer_norm.bias += logit_shift * direction / direction.dot(direction)
