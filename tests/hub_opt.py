"""A local decoder folder shaped like ``facebook/opt-1.3b`` on the Hub, made at test time (no download).

``config.json`` holds the real model's fields and values (``dropout: 0.1``, pad/bos/eos 1/2/2,
``torch_dtype: float16``, ``vocab_size: 50272``, larger than its tokenizer as in the real model); only width and
depth are shrunk. Random weights are saved with ``save_pretrained`` in float16, next to the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# facebook/opt-1.3b config.json, field for field (huggingface.co/facebook/opt-1.3b/blob/main/config.json).
OPT_1_3B = {
    "_name_or_path": "facebook/opt-1.3b",
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "architectures": ["OPTForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "do_layer_norm_before": True,
    "dropout": 0.1,
    "eos_token_id": 2,
    "ffn_dim": 8192,
    "hidden_size": 2048,
    "init_std": 0.02,
    "layerdrop": 0.0,
    "max_position_embeddings": 2048,
    "model_type": "opt",
    "num_attention_heads": 32,
    "num_hidden_layers": 24,
    "pad_token_id": 1,
    "prefix": "</s>",
    "torch_dtype": "float16",
    "transformers_version": "4.21.0.dev0",
    "use_cache": True,
    "vocab_size": 50272,
    "word_embed_proj_dim": 2048,
}
HUB_FILE_ONLY = ("_name_or_path", "architectures", "model_type", "torch_dtype", "transformers_version")


def opt_config(**fields):
    """An ``OPTConfig`` of the real model's fields, with ``fields`` replacing some (sizes)."""
    from transformers import OPTConfig

    values = {k: v for k, v in {**OPT_1_3B, **fields}.items() if k not in HUB_FILE_ONLY}
    return OPTConfig(**values)


def write_opt_folder(directory: str | Path, tokenizer_dir: str | Path, *, hidden: int = 64, layers: int = 2,
                     heads: int = 4, seed: int = 0) -> Path:
    """``facebook/opt-1.3b``'s folder layout and config, ``hidden`` wide and ``layers`` deep, fp16 weights."""
    from transformers import OPTForCausalLM

    sizes = {"hidden_size": hidden, "word_embed_proj_dim": hidden, "ffn_dim": 4 * hidden, "num_hidden_layers": layers,
             "num_attention_heads": heads}
    directory = Path(directory)
    torch.manual_seed(seed)
    OPTForCausalLM(opt_config(**sizes)).half().save_pretrained(str(directory))
    # The Hub's file as written by the transformers that saved it (torch_dtype, not transformers 5's dtype).
    (directory / "config.json").write_text(json.dumps({**OPT_1_3B, **sizes}, indent=2))
    for item in Path(tokenizer_dir).iterdir():
        shutil.copy2(item, directory / item.name)
    return directory
