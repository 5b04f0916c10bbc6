"""``Recaptioner``: THE inference path. Load a trained captioner, re-caption images, save and share it.

```python
from altogether import Recaptioner

captioner = Recaptioner.from_pretrained("runs/finetune_round3/export")    # or "you/altogether-opt1.3b"
captioner.recaption(["cat.jpg", "shop.png"], ["my cat Tom", ["zorbit K-12", "IMG_2231.jpg"]])
captioner.recaption(images, do_sample=False)          # greedy, no alt-texts: captioning from scratch
captioner.push_to_hub("you/altogether-opt1.3b", private=True)
```
Every caption the library writes (this class, sharded ``recaption``, ``evaluate``, training's sample captions,
annotation prefill, the demo) goes through the same three steps:

* :class:`Prepare` (image + alt-texts -> :class:`Prepared`: prompt ids by the training prompt rule,
  :func:`altogether.layout.build_prompt` + :func:`~altogether.layout.tokenize_sample`, and pixels by the
  encoder's own open_clip transform). It is a small picklable object, so it runs in data-loader workers.
* batching by prompt length (:func:`length_sorted_batches`);
* :meth:`Recaptioner.caption` (a batch of prepared images -> captions, decoded by :meth:`Recaptioner.decode`),
  with one :class:`~altogether.generation.GenerationConfig`.

So a caption is the same text whichever door it came through, for the same image, prompt, settings and seed.
"""

from __future__ import annotations

import importlib.util
import tempfile
import unicodedata
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from omegaconf import OmegaConf

from .config import LayoutConfig, ModelConfig
from .data.images import load_image
from .data.records import ImageRef
from .export import (EXTRA_KEYS, ExportError, decoder_max_positions, export_model_config, generation_from,
                     layout_from, load_export, save_export)
from .generation import GenerationConfig, max_positions
from .layout import build_prompt, tokenize_sample
from .model import AltogetherModel, causal_lm

AltTexts = str | Sequence[str] | None

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# Prepare: runs where the data is read (data-loader workers)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One image's prompt: the text the training prompt rule builds and its token ids (cut to the budget)."""

    text: str
    ids: list[int]


@dataclass(frozen=True)
class Prepared:
    """One image ready for :meth:`Recaptioner.caption`.

    ``pixel_values``: ``(3, H, W)`` float32, the encoder transform's output; or ``image_embeds``: ``(embed_dim,)``
    for a model fed cached embeddings. ``stream_key``: names the image's random stream for seeded sampling
    (a CRC-32 of the pixels or embedding and the prompt ids: the same image and prompt draw the same stream,
    wherever and with whatever batch they are captioned).
    """

    prompt: Prompt
    pixel_values: torch.Tensor | None
    stream_key: int
    image_embeds: torch.Tensor | None = None


@dataclass(frozen=True)
class Prepare:
    """Image + alt-texts -> :class:`Prepared`. Holds the tokenizer, the image transform and the layout only,
    so it pickles and runs in data-loader workers: decoding and transforming images off the main process."""

    tokenizer: Any
    transform: Callable | None
    layout: LayoutConfig

    def prompt(self, alt_texts: AltTexts) -> Prompt:
        """The prompt of one image, by the same rule as in training."""
        text = build_prompt(alt_texts, self.layout.alt_separator)
        ids = tokenize_sample(self.tokenizer, text, None, max_alt_tokens=self.layout.max_alt_tokens,
                              max_caption_tokens=self.layout.max_caption_tokens, prompt_end=self.layout.prompt_end).alt_ids
        return Prompt(text, ids)

    def image(self, image: ImageRef, prompt: Prompt, *, key: str = "") -> Prepared:
        """Decode ``image`` (:class:`~altogether.data.records.BadRecord` naming ``key`` if it cannot be) and run
        the encoder transform; ``prompt`` from :meth:`prompt`."""
        if self.transform is None:
            raise RuntimeError("this captioner has no image transform (a model fed cached embeddings): "
                               "prepare images with Prepare.embedded")
        pixels = self.transform(load_image(image, key=key))
        return Prepared(prompt, pixels, _stream_key(pixels, prompt))

    def embedded(self, image_embeds: torch.Tensor, alt_texts: AltTexts) -> Prepared:
        """An image given by its cached embedding ``(embed_dim,)`` instead of its pixels."""
        prompt = self.prompt(alt_texts)
        return Prepared(prompt, None, _stream_key(image_embeds, prompt), image_embeds=image_embeds)

    def __call__(self, image: ImageRef, alt_texts: AltTexts = None, *, key: str = "") -> Prepared:
        return self.image(image, self.prompt(alt_texts), key=key)


def _stream_key(tensor: torch.Tensor, prompt: Prompt) -> int:
    pixels = zlib.crc32(tensor.detach().float().cpu().contiguous().numpy())
    return zlib.crc32(array("q", prompt.ids).tobytes(), pixels)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches, longest prompts first (ties in input order); ``[[]]`` when there are none.

    Similar lengths share a batch, so little of a batch is padding, and memory peaks on the first batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)] or [[]]


# ---------------------------------------------------------------------------------------------------------
# The captioner
# ---------------------------------------------------------------------------------------------------------


class Recaptioner:
    """A trained Altogether captioner ready for inference.

    Load one with :meth:`from_pretrained`, or wrap a model in memory (training's sample captions do):
    ``Recaptioner(model, tokenizer, transform, layout, generation)``. ``layout``: a
    :class:`~altogether.config.LayoutConfig` (or mapping; default: the paper's); ``generation``: the default
    :class:`~altogether.generation.GenerationConfig` (or mapping) that calls override; ``meta`` and
    ``directory``: the export's ``altogether.json`` content and folder, when it came from one.
    """

    def __init__(self, model: AltogetherModel, tokenizer, transform: Callable | None,
                 layout: LayoutConfig | Mapping[str, Any] | None = None,
                 generation: GenerationConfig | Mapping[str, Any] | None = None, *,
                 meta: dict[str, Any] | None = None, directory: str | Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.layout = _layout(layout)
        self.generation = generation if isinstance(generation, GenerationConfig) else \
            GenerationConfig.from_dict(generation)
        self.meta = meta or {}
        self.directory = None if directory is None else Path(directory)
        self.prepare = Prepare(tokenizer, transform, self.layout)

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
        return cls(model.to(device=device, dtype=dtype), tokenizer, transform, layout_from(meta),
                   generation_from(meta), meta=meta, directory=directory)

    @property
    def device(self) -> torch.device:
        return next(self.model.mapper.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.mapper.parameters()).dtype

    def __repr__(self) -> str:
        lora = " +LoRA" if self.meta.get("lora") and hasattr(self.model.decoder, "peft_config") else ""
        source = repr(str(self.directory)) if self.directory is not None else "in memory"
        return f"Recaptioner({source}, device={self.device}, dtype={self.dtype}{lora})"

    # -- settings ------------------------------------------------------------------------------------------

    def settings(self, overrides: Mapping[str, Any] | None = None, *, num_captions: int = 1,
                 count_key: str = "num_captions", **kwargs: Any) -> GenerationConfig:
        """This captioner's generation defaults with ``overrides`` / ``kwargs`` applied (``None`` keeps a value)
        and ``num_captions`` captions per image, validated and checked against the model: ``max_new_tokens``
        after the longest prompt must fit the decoder's position table. Raises
        :class:`~altogether.generation.GenerationError` (a ``ValueError``), ``TypeError`` for an unknown name.
        """
        given = {**(overrides or {}), **kwargs}
        if "num_return_sequences" in given:
            raise TypeError("give num_captions, not num_return_sequences (the number of captions per image)")
        generation = self.generation.merge(given, num_return_sequences=num_captions, count_key=count_key)
        self.check(generation)
        return generation

    def check(self, generation: GenerationConfig) -> None:
        """Validate ``generation`` and check it against this model (see :meth:`settings`)."""
        _check(generation, self.model.mapper.num_tokens, self.layout,
               max_positions(causal_lm(self.model.decoder).config))

    # -- captioning ----------------------------------------------------------------------------------------

    def prompt_ids(self, alt_texts: AltTexts) -> list[int]:
        """Token ids of one image's prompt, built by the same rule as in training."""
        return self.prepare.prompt(alt_texts).ids

    @torch.no_grad()
    def caption(self, items: Sequence[Prepared], generation: GenerationConfig) -> list[list[str]]:
        """Captions of one batch of prepared images: ``generation.num_return_sequences`` per image, in order.

        Runs the model in eval mode (and puts back the mode it was in), with pixels moved to its device and
        the encoder's dtype. Seeded sampling draws each caption from its image's own stream (see
        :class:`Prepared`), so the batch it shares does not change it.
        """
        if not items:
            return []
        self.check(generation)
        was_training = self.model.training
        self.model.eval()
        try:
            if items[0].image_embeds is not None:
                embeds = torch.stack([it.image_embeds for it in items]).to(self.device)
            else:
                pixels = torch.stack([it.pixel_values for it in items])
                embeds = self.model.embed_images(pixels.to(device=self.device, dtype=self._encoder_dtype))
            ids = self.model.generate(embeds, [it.prompt.ids for it in items], generation,
                                      stream_keys=[it.stream_key for it in items])
        finally:
            self.model.train(was_training)
        k = generation.num_return_sequences
        return [[self.decode(t) for t in ids[i * k : (i + 1) * k]] for i in range(len(items))]

    def recaption(
        self,
        images: ImageRef | Sequence[ImageRef],
        alt_texts: AltTexts | Sequence[AltTexts] = None,
        *,
        batch_size: int = 16,
        num_captions: int = 1,
        progress: bool | str = False,
        **generation_kwargs: Any,
    ) -> list[str] | list[list[str]]:
        """Captions of ``images`` (PIL images, file paths, encoded bytes, or numpy arrays / torch tensors of pixels,
        ``N x ...`` for a batch; :func:`~altogether.data.images.load_image` says which), one list entry per image.

        ``alt_texts``: ``None`` (caption from scratch) or one entry per image, each a string, a list of strings
        (several alt-texts of one image, joined by the training prompt rule), or ``None`` / NaN for none; a
        number is a TypeError naming its entry. A single image may be
        passed on its own, with its alt-text(s) on their own. ``num_captions > 1`` returns a list of lists.
        Generation keywords use Hugging Face names (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_p``, ``top_k``, ``num_beams``, ...; :class:`~altogether.generation.GenerationConfig`) and default
        to the export's settings; ``seed`` makes sampling reproducible, each image drawing from a stream of its
        own. Images are batched by prompt length internally; results come back in input order, and each
        equals what the image gets captioned alone. ``progress``: a progress bar on stderr (a string labels it).
        """
        from tqdm.auto import tqdm

        images, alt_texts = _per_image(images, alt_texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        generation = self.settings(generation_kwargs, num_captions=num_captions)
        prompts = []
        for i, alt in enumerate(alt_texts):
            try:
                prompts.append(self.prepare.prompt(alt))
            except TypeError as err:
                raise TypeError(f"alt_texts[{i}]: {err}") from None
        captions: list[list[str]] = [[] for _ in images]
        label = progress if isinstance(progress, str) else "recaption"
        with tqdm(total=len(images), desc=label, unit="img", disable=not progress) as bar:
            for rows in length_sorted_batches([len(p.ids) for p in prompts], batch_size):
                items = [self.prepare.image(images[i], prompts[i], key=f"images[{i}]") for i in rows]
                for i, texts in zip(rows, self.caption(items, generation)):
                    captions[i] = texts
                bar.update(len(rows))
        return [c[0] for c in captions] if num_captions == 1 else captions

    @property
    def _encoder_dtype(self) -> torch.dtype:
        return next(self.model.encoder.parameters()).dtype

    def decode(self, ids: list[int]) -> str:
        """Decoded caption on one line: special tokens dropped, control characters and runs of spaces collapsed."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return " ".join("".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text).split())

    # -- saving and sharing -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, *, include_encoder: bool = False,
                        repo_id: str | None = None, publish: bool = False) -> Path:
        """Write an export folder (weights, configs, tokenizer, evaluation files, ``README.md`` model card).

        The encoder is referenced by its open_clip name + tag unless ``include_encoder`` (or it has no portable
        reference); a LoRA adapter is saved as an adapter unless it was merged on load. ``repo_id`` is only
        used in the model card's usage snippet. ``publish`` writes what :meth:`push_to_hub` uploads: absolute
        local paths in ``altogether.json`` and the card become names (:func:`altogether.hub.without_local_paths`).
        """
        from .hub import finish_folder

        if self.directory is None or "model" not in self.meta:
            raise ValueError("this Recaptioner wraps a model in memory, without its export's model config: "
                             "write an export with altogether.export.save_export instead")
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), self.meta["model"])
        model_cfg.encoder = export_model_config(self.directory, self.meta).encoder  # where it loads from now
        directory = save_export(
            directory, self.model, self.tokenizer, model_cfg=model_cfg, layout=self.layout,
            generation=self.generation, recipe=self.meta.get("recipe"), include_encoder=include_encoder,
            encoder_source=self.meta.get("encoder_source"),
            extra={k: self.meta[k] for k in EXTRA_KEYS if k in self.meta},
        )
        return finish_folder(directory, self.directory, repo_id=repo_id, publish=publish)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    include_encoder: bool = False, commit_message: str = "Upload Altogether captioner") -> str:
        """Upload this captioner (what :meth:`save_pretrained` writes) to a Hub model repo; returns its URL.

        ``token`` defaults to the logged-in one (``HF_TOKEN`` / ``hf auth login``); it is never logged.
        """
        from .hub import upload_folder

        with tempfile.TemporaryDirectory(prefix="altogether-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "repo", include_encoder=include_encoder, repo_id=repo_id,
                                          publish=True)
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

    if isinstance(images, (str, Path, bytes, Image.Image)) or getattr(images, "ndim", 4) <= 3:
        return [images], [alt_texts]  # one image (an array of up to 3 dimensions is one image, 4 are a batch)
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


def check_export_generation(meta: dict[str, Any], generation: GenerationConfig) -> None:
    """:meth:`Recaptioner.check` from an export's ``altogether.json`` alone, before its model loads."""
    _check(generation, meta["model"]["mapper"]["num_visual_tokens"], layout_from(meta), decoder_max_positions(meta))


def _check(generation: GenerationConfig, num_visual_tokens: int, layout: Any, max_position_embeddings: int | None):
    generation.validate()
    # prompt_end's tokens, known without the tokenizer: at most one per UTF-8 byte (byte fallback), plus the
    # word-start piece SentencePiece may put before them.
    end_tokens = len(layout.prompt_end.encode("utf-8")) + 1 if layout.prompt_end else 0
    generation.check_positions(max_prompt_tokens=num_visual_tokens + layout.max_alt_tokens + end_tokens,
                               max_position_embeddings=max_position_embeddings)


def _layout(layout: LayoutConfig | Mapping[str, Any] | None) -> LayoutConfig:
    """A plain :class:`LayoutConfig` (it travels to data-loader workers with :class:`Prepare`)."""
    if isinstance(layout, LayoutConfig):
        return layout
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LayoutConfig), layout or {}))  # type: ignore


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
