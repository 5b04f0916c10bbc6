"""``Recaptioner``: load a trained captioner (export folder or Hub repo), re-caption images, save and share it.

```python
from altogether import Recaptioner

captioner = Recaptioner.from_pretrained("runs/finetune_round3/export")    # or "you/altogether-opt1.3b"
captioner.recaption(["cat.jpg", "shop.png"], ["my cat Tom", ["zorbit K-12", "IMG_2231.jpg"]])
captioner.recaption(images, do_sample=False)          # greedy, no alt-texts: captioning from scratch
captioner.push_to_hub("you/altogether-opt1.3b", private=True)
```
Prompts go through :func:`altogether.layout.build_prompt` and :func:`~altogether.layout.tokenize_sample`, the
same rule training used; images through the encoder's own open_clip transform.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from omegaconf import OmegaConf

from .config import ModelConfig
from .data.images import load_image
from .data.records import ImageRef
from .export import ExportError, export_model_config, generation_from, layout_from, load_export, save_export
from .layout import build_prompt, tokenize_sample
from .model import AltogetherModel

AltTexts = str | Sequence[str] | None

# Hugging Face ``generate`` names accepted by :meth:`Recaptioner.recaption` (``seed`` is ours).
GENERATION_KWARGS = frozenset({
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams", "seed",
    "repetition_penalty", "no_repeat_ngram_size", "length_penalty", "exponential_decay_length_penalty",
})
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
# altogether.json entries save_export writes itself; anything else (e.g. "training") is carried over on save.
_EXPORT_KEYS = frozenset({"format", "version", "model", "encoder_source", "decoder_hf_config", "lora", "layout",
                          "generation", "recipe"})


class Recaptioner:
    """A trained Altogether captioner ready for inference. Build it with :meth:`from_pretrained`."""

    def __init__(self, model: AltogetherModel, tokenizer, transform, meta: dict[str, Any], directory: str | Path):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.transform = transform
        self.meta = meta
        self.directory = Path(directory)
        self.layout = layout_from(meta)
        self.generation = generation_from(meta)

    # -- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        merge_lora: bool = False,
        base_decoder: str | None = None,
        attn_implementation: str = "auto",
        revision: str | None = None,
        token: str | None = None,
    ) -> "Recaptioner":
        """Load an export folder or a Hugging Face Hub repo holding one.

        ``device``: default CUDA when available, else CPU. ``dtype``: default bfloat16 on GPU (float16 where the
        GPU lacks bfloat16), float32 on CPU. ``merge_lora`` merges a LoRA adapter into the decoder weights;
        ``base_decoder`` points a LoRA export's referenced base decoder at a local copy;
        ``attn_implementation``: ``auto`` uses flash-attention 2 only when installed and on CUDA.
        """
        device = _device(device)
        dtype = _dtype(dtype, device)
        _check_attention(attn_implementation, device)
        directory = resolve_source(path_or_hub_id, revision=revision, token=token)
        model, tokenizer, transform, meta = load_export(
            directory, device=device, merge_lora=merge_lora, base_decoder=base_decoder,
            attn_implementation=attn_implementation, dtype=dtype,
        )
        return cls(model.to(device=device, dtype=dtype), tokenizer, transform, meta, directory)

    @property
    def device(self) -> torch.device:
        return next(self.model.mapper.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.mapper.parameters()).dtype

    def __repr__(self) -> str:
        lora = " +LoRA" if self.meta.get("lora") and hasattr(self.model.decoder, "peft_config") else ""
        return f"Recaptioner({str(self.directory)!r}, device={self.device}, dtype={self.dtype}{lora})"

    # -- captioning ----------------------------------------------------------------------------------------

    def prompt_ids(self, alt_texts: AltTexts) -> list[int]:
        """Token ids of one image's prompt, built by the same rule as in training."""
        prompt = build_prompt(alt_texts, self.layout.alt_separator)
        return tokenize_sample(self.tokenizer, prompt, None, max_alt_tokens=self.layout.max_alt_tokens,
                               max_caption_tokens=self.layout.max_caption_tokens).alt_ids

    @torch.no_grad()
    def recaption(
        self,
        images: ImageRef | Sequence[ImageRef],
        alt_texts: AltTexts | Sequence[AltTexts] = None,
        *,
        batch_size: int = 16,
        num_captions: int = 1,
        **generation_kwargs: Any,
    ) -> list[str] | list[list[str]]:
        """Captions of ``images`` (PIL images, file paths or encoded bytes), one list entry per image.

        ``alt_texts``: ``None`` (caption from scratch) or one entry per image, each a string, a list of strings
        (several alt-texts of one image, joined by the training prompt rule) or ``None``. A single image may be
        passed on its own, with its alt-text(s) on their own. ``num_captions > 1`` returns a list of lists.
        Generation keywords use Hugging Face names (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_p``, ``top_k``, ``num_beams``, ...) and default to the export's settings; ``seed`` makes sampling
        reproducible. Images are batched by prompt length internally; results come back in input order, and
        each equals what the image gets captioned alone (greedy).
        """
        images, alt_texts = _per_image(images, alt_texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        settings = self._settings(generation_kwargs, num_captions)
        seed = settings.pop("seed", None)
        prompts = [self.prompt_ids(alt) for alt in alt_texts]
        # Longest prompts first: similar lengths share a batch (less padding) and memory peaks on the first batch.
        order = sorted(range(len(images)), key=lambda i: -len(prompts[i]))
        captions: list[list[str]] = [[] for _ in images]
        with _seeded(seed, self.device):
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                pixels = torch.stack([self.transform(load_image(images[i], key=f"images[{i}]")) for i in rows])
                embeds = self.model.embed_images(pixels.to(device=self.device, dtype=self._encoder_dtype))
                ids = self.model.generate(embeds, [prompts[i] for i in rows], num_return_sequences=num_captions,
                                          **settings)
                for k, i in enumerate(rows):
                    captions[i] = [self.decode(t) for t in ids[k * num_captions : (k + 1) * num_captions]]
        return [c[0] for c in captions] if num_captions == 1 else captions

    @property
    def _encoder_dtype(self) -> torch.dtype:
        return next(self.model.encoder.parameters()).dtype

    def _settings(self, kwargs: dict[str, Any], num_captions: int) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - GENERATION_KWARGS)
        if unknown:
            raise TypeError(f"recaption() got unknown generation argument(s) {', '.join(unknown)}; "
                            f"valid: {', '.join(sorted(GENERATION_KWARGS))}")
        settings = {**OmegaConf.to_container(self.generation), **kwargs}
        decay = settings.get("exponential_decay_length_penalty")
        if decay is not None and (len(decay) != 2 or int(decay[0]) != decay[0] or decay[0] < 0 or decay[1] < 1):
            raise ValueError(f"exponential_decay_length_penalty must be (start, factor) with a whole start >= 0 and "
                             f"a factor >= 1, got {decay!r}")
        if settings["max_new_tokens"] < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {settings['max_new_tokens']}")
        if num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {num_captions}")
        if num_captions > 1 and not settings["do_sample"] and settings["num_beams"] < num_captions:
            raise ValueError(f"num_captions={num_captions} needs do_sample=True or num_beams >= {num_captions}: "
                             "greedy decoding gives one caption per image")
        return settings

    def decode(self, ids: list[int]) -> str:
        """Decoded caption on one line: special tokens dropped, control characters and runs of spaces collapsed."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return " ".join("".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text).split())

    # -- saving and sharing -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, *, include_encoder: bool = False,
                        repo_id: str | None = None) -> Path:
        """Write an export folder (weights, configs, tokenizer, evaluation files, ``README.md`` model card).

        The encoder is referenced by its open_clip name + tag unless ``include_encoder`` (or it has no portable
        reference); a LoRA adapter is saved as an adapter unless it was merged on load. ``repo_id`` is only
        used in the model card's usage snippet.
        """
        from .hub import finish_folder

        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), self.meta["model"])
        model_cfg.encoder = export_model_config(self.directory, self.meta).encoder  # where it loads from now
        directory = save_export(
            directory, self.model, self.tokenizer, model_cfg=model_cfg, layout=self.layout,
            generation=self.generation, recipe=self.meta.get("recipe"), include_encoder=include_encoder,
            encoder_source=self.meta.get("encoder_source"),
            extra={k: v for k, v in self.meta.items() if k not in _EXPORT_KEYS},
        )
        return finish_folder(directory, self.directory, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    include_encoder: bool = False, commit_message: str = "Upload Altogether captioner") -> str:
        """Upload this captioner (what :meth:`save_pretrained` writes) to a Hub model repo; returns its URL.

        ``token`` defaults to the logged-in one (``HF_TOKEN`` / ``hf auth login``); it is never logged.
        """
        from .hub import upload_folder

        with tempfile.TemporaryDirectory(prefix="altogether-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "repo", include_encoder=include_encoder, repo_id=repo_id)
            return upload_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def resolve_source(path_or_hub_id: str | Path, *, revision: str | None = None, token: str | None = None) -> Path:
    """A local export folder as is, else the snapshot of the Hub repo of that id (downloaded or cached)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ExportError(f"{path_or_hub_id}: is a file; expected an export folder or a Hugging Face Hub repo id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_hub_id), revision=revision, token=token, library_name="altogether"))
    except (OSError, ValueError) as err:  # not found, offline and not cached, invalid id, HTTP errors
        raise ExportError(
            f"{str(path_or_hub_id)!r} is neither a local export folder nor a reachable or cached Hugging Face Hub "
            f"repo ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Give the path of an "
            "export folder (e.g. runs/NAME/export), or a Hub id with network access (HF_HUB_OFFLINE unset)."
        ) from None


def _per_image(images, alt_texts) -> tuple[list[ImageRef], list[AltTexts]]:
    """Images and their alt-text entries as equal-length lists; a lone image takes its alt-text(s) as given."""
    from PIL import Image

    if isinstance(images, (str, Path, bytes, Image.Image)):
        return [images], [alt_texts]
    images = list(images)
    if alt_texts is None:
        return images, [None] * len(images)
    if isinstance(alt_texts, str):
        raise TypeError("alt_texts must hold one entry per image (a list), not a single string: "
                        "wrap it as [alt_text] for one image")
    alt_texts = list(alt_texts)
    if len(alt_texts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(alt_texts)} alt-text entries: give one entry per image "
                         "(None for no alt-text, a list for several)")
    return images, alt_texts


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed sampling without disturbing the caller's global random state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device={str(device)!r} but no CUDA GPU is usable (torch {torch.__version__}, {build}); "
                         "use device='cpu' or install a CUDA build of torch on a machine with a GPU")
    return device


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def _check_attention(attn_implementation: str, device: torch.device) -> None:
    if attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attn_implementation='flash_attention_2' needs the optional flash-attn package: install "
                         "the gpu extra (pip install 'altogether[gpu]'), or use attn_implementation='auto'")
    if device.type != "cuda":
        raise ValueError(f"attn_implementation='flash_attention_2' runs on CUDA only, not on {device}")
