"""The Hugging Face model card (``README.md``) of an export, generated from what the run recorded.

Everything comes from the export's ``altogether.json`` (model, encoder source, LoRA entry, layout, generation
defaults, the resolved recipe, training counts) and the evaluation files found next to it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

MAX_EVAL_ROWS = 100
PAPER = "Xu et al., *Altogether: Image Captioning via Re-aligning Alt-text*, EMNLP 2024"

LIMITATIONS = """\
- **Captions inherit what the alt-text says.** The model re-aligns the given alt-text with the image: it keeps
  names, places, product codes and other facts from the alt-text that it cannot verify from the pixels. A wrong,
  misleading or offensive alt-text can come back as a fluent caption. Without an alt-text it captions from the
  image alone and knows fewer concrete names.
- **It can hallucinate** objects, counts, colours or text that are not in the image, as any captioner can.
- **People.** The human annotation guidelines of the fine-tuning captions forbid describing a person's racial or
  ethnic origin (including skin colour, hair colour, apparent nationality), sexual orientation, political
  affiliation, health condition or disability, religion, trade-union membership, facial features or
  expressions, and adding identifying information such as names, addresses or e-mails. The model is trained to
  follow them but nothing guarantees it: do not use it to infer or describe such attributes, and review
  captions of people before publishing them.
- English only; the decoder sees at most the alt-text's first {max_alt} tokens and writes at most {max_caption}.
"""

INTENDED_USE = """\
Re-captioning image/alt-text pairs at scale to build better training captions for image-text models (CLIP-style
contrastive training, text-to-image generation), and drafting captions for human annotators who then correct
them. Not intended for describing images to end users without review, nor for any decision about people.
"""


def render_card(meta: dict[str, Any], *, evaluation: dict[str, Any] | None = None, repo_id: str | None = None,
                load_path: str | None = None) -> str:
    """The card's Markdown, YAML front matter included.

    ``evaluation`` maps an evaluation file name to its JSON content; ``repo_id`` (or else ``load_path``) is what
    the usage snippet loads.
    """
    recipe = meta.get("recipe") or {}
    layout = meta.get("layout") or {}
    front = {
        "library_name": "altogether",
        "pipeline_tag": "image-to-text",
        "tags": ["altogether", "image-captioning", "image-to-text", "alt-text", "re-captioning"]
        + (["lora", "peft"] if meta.get("lora") else []),
    }
    bases = base_models(meta)
    if bases:
        front["base_model"] = bases
    title = repo_id.split("/")[-1] if repo_id else f"Altogether captioner ({recipe.get('recipe', 'export')})"
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---",
        f"# {title}",
        "An Altogether re-alignment captioner (" + PAPER + "). Given an image and its alt-text it writes a dense"
        " caption that keeps what the alt-text says about the image and adds what the image shows; given no"
        " alt-text it captions from scratch. Architecture: frozen open_clip image encoder -> ClipCap transformer"
        " mapper -> visual tokens, then the alt-text tokens, then a causal language model writes the caption.",
        "## Usage\n\n```python\nfrom altogether import Recaptioner\n\n"
        f"captioner = Recaptioner.from_pretrained({json.dumps(repo_id or load_path or 'PATH_OR_REPO_ID')})\n"
        'captions = captioner.recaption(["photo.jpg"], ["the photo\'s alt-text"])\n```',
        "## Model\n\n" + _model_table(meta),
        "## Training\n\n" + _training(meta, recipe),
        "## Evaluation\n\n" + _evaluation(evaluation or {}),
        "## Generation defaults\n\n" + _generation(meta.get("generation") or {}),
        "## Intended use\n\n" + INTENDED_USE,
        "## Limitations\n\n" + LIMITATIONS.format(max_alt=layout.get("max_alt_tokens", "?"),
                                                  max_caption=layout.get("max_caption_tokens", "?")),
    ]
    if recipe:
        sections.append("## Resolved recipe\n\n<details><summary>config.yaml</summary>\n\n```yaml\n"
                        + yaml.safe_dump(recipe, sort_keys=False) + "```\n\n</details>")
    return "\n\n".join(s.rstrip() for s in sections) + "\n"


def base_models(meta: dict[str, Any]) -> list[str]:
    """Hub ids of the pretrained encoder and decoder the captioner was built from (local sources are left out)."""
    ids = []
    encoder = meta.get("encoder_source") or {}
    name, tag = encoder.get("name", ""), encoder.get("pretrained")
    if name.startswith("hf-hub:"):
        ids.append(name[len("hf-hub:"):])
    elif tag and not name.startswith("local-dir:"):
        import open_clip

        hub = open_clip.get_pretrained_cfg(name, tag).get("hf_hub")
        if hub:
            ids.append(hub.rstrip("/"))
    decoder = _decoder_source(meta)
    if decoder and _is_hub_id(decoder):
        ids.append(decoder)
    return ids


def _decoder_source(meta: dict[str, Any]) -> str | None:
    lora = meta.get("lora") or {}
    if lora.get("base_decoder"):
        return lora["base_decoder"]
    decoder = (meta.get("model") or {}).get("decoder") or {}
    return None if decoder.get("config") is not None else decoder.get("name_or_path")


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not Path(name).expanduser().exists()


def _model_table(meta: dict[str, Any]) -> str:
    model = meta.get("model") or {}
    encoder = meta.get("encoder_source") or {}
    included = (model.get("encoder") or {}).get("name") == "local-dir:encoder"
    mapper = model.get("mapper") or {}
    decoder_cfg = model.get("decoder") or {}
    hf = meta.get("decoder_hf_config") or {}
    source = _decoder_source(meta)
    decoder = f"`{source}`" if source else (
        f"built from a config with random initial weights ({hf.get('model_type', '?')}, "
        f"{hf.get('num_hidden_layers', '?')} layers, width {hf.get('hidden_size', '?')})")
    lora = meta.get("lora")
    if lora:
        training = "LoRA adapter in `adapter/`" + (
            ", on the base decoder named here" if lora.get("base_decoder") else ", base weights in `model.safetensors`")
    else:
        training = {"full": "fully fine-tuned", "frozen": "frozen"}.get(decoder_cfg.get("trainable", "full"), "")
    rows = [
        ("image encoder (frozen)",
         f"open_clip `{encoder.get('name')}`, pretrained `{encoder.get('pretrained')}`",
         "copied in `encoder/`" if included else "referenced, not copied"),
        ("mapper (trained)",
         f"ClipCap transformer mapper: {mapper.get('num_visual_tokens')} visual tokens, "
         f"num_layers={mapper.get('num_layers')}, num_heads={mapper.get('num_heads')}", "`model.safetensors`"),
        ("decoder", decoder, training),
    ]
    lines = ["| part | source | in this repo |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _training(meta: dict[str, Any], recipe: dict[str, Any]) -> str:
    if not recipe:
        return "No recipe was recorded with this export."
    data = recipe.get("data") or {}
    optim = recipe.get("optim") or {}
    layout = recipe.get("layout") or {}
    if not data.get("train"):
        source = "records handed to `fit(sources=...)` in code (no data file recorded)"
    else:
        source = f"`{data.get('train')}` ({data.get('format')} format)"
    if data.get("task") == "pretrain":
        target = "pretraining: the target is the image's longest alt-text, the prompt another alt-text or none"
    else:
        target = f"fine-tuning: the target is the `{data.get('target_key')}` caption, the prompt the `{data.get('alt_key')}` alt-text(s)"
    counts = meta.get("training") or {}
    lines = [
        f"- Recipe: `{recipe.get('recipe')}`" + (f" — {recipe['description']}" if recipe.get("description") else ""),
        f"- Data: {source}; {target}; the alt-text is dropped with probability {layout.get('prompt_dropout')} so the"
        " model also captions without one.",
        f"- Started from: `{recipe['init_from']}`" if recipe.get("init_from") else "- Started from: the base models",
        f"- Optimisation: AdamW, lr {optim.get('lr')}, warm-up {optim.get('warmup_steps')} steps then cosine to "
        f"{optim.get('min_lr_ratio')} x lr, {optim.get('max_steps')} steps of global batch {optim.get('global_batch_size')}",
    ]
    if counts:
        lines.append(f"- Optimizer steps run: {counts.get('steps')}; records skipped as unreadable: "
                     f"{counts.get('skipped')}; captions truncated to the token budget: {counts.get('truncated_captions')}")
    return "\n".join(lines)


def _evaluation(evaluation: dict[str, Any]) -> str:
    if not evaluation:
        return "No evaluation results were found with this run."
    parts = [_evaluation_table(name, data) for name, data in evaluation.items()]
    return "\n\n".join(p for p in parts if p) or "The evaluation files hold no numbers."


def _evaluation_table(name: str, data: Any) -> str:
    """The table ``evaluate`` printed, from its ``metrics.json`` (conditions, then the baselines, then what was
    skipped and why); any other file of ``{row: {metric: value}}`` as the same table; else its numeric fields."""
    from .evaluate import format_table

    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        rows = {**data["metrics"], **(data.get("baselines") or {})}
        about = data.get("data") or {}
        head = (f"From `{name}`: `{about.get('id')}`, {about.get('evaluated')} records, "
                f"{(data.get('generation') or {}).get('do_sample') and 'sampled' or 'greedy'} captions.")
        return f"{head}\n\n{format_table(rows, data.get('skipped'))}"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and all(
            x is None or isinstance(x, (int, float)) for x in v.values()) for v in data.values()):
        return f"From `{name}`:\n\n{format_table(data)}"
    rows = list(_numbers(data))[:MAX_EVAL_ROWS]
    if not rows:
        return ""
    return (f"From `{name}`:\n\n| metric | value |\n|---|---|\n"
            + "\n".join(f"| {key} | {_fmt(value)} |" for key, value in rows))


def _numbers(data: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Numeric leaves of nested JSON objects as (``a / b / c``, value); lists (per-sample results) are left out."""
    if isinstance(data, bool):
        return
    if isinstance(data, (int, float)):
        yield prefix or "value", data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _numbers(value, f"{prefix} / {key}" if prefix else str(key))


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _generation(gen: dict[str, Any]) -> str:
    shown = json.dumps(gen, sort_keys=True)
    return (f"`{shown}` (Hugging Face `generate` names; `top_k: 0` means off). Override any of them per call, "
            "e.g. `recaption(images, alts, do_sample=False)` for greedy captions, `seed=0` for reproducible sampling.")
