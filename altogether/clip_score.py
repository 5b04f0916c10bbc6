"""CLIPScore (Hessel et al., 2021) of image-caption pairs with an open_clip model.

Score scale: ``CLIPScore = 100 * max(cos(image, text), 0)``, i.e. Hessel et al.'s formula with
w = 1 on a 0-100 scale: the scale of the Altogether paper's Table 1 (alt-texts score about 29).
Multiply by 2.5 for Hessel et al.'s w = 2.5 convention. Hessel et al. also prefix captions with
"A photo depicts"; no prefix is added here.

Truncation: CLIP text towers read a fixed context (77 tokens for the OpenAI-style models) and dense
captions are longer. Captions are tokenized with the model's own open_clip tokenizer, which keeps
the START of the text: the default BPE tokenizer keeps the start-of-text token and the first
``context_length - 2`` BPE tokens and ends with the end-of-text token (Hugging Face tokenizers used
by some towers also truncate on the right). So only roughly the first 50-60 words of a caption are
scored; each score carries a ``truncated`` flag and :attr:`ScoreResult.truncation_rate` reports how
often that happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .model import WeightsUnavailableError

CLIPSCORE_KEY = "CLIPScore"
TRUNCATION_KEY = "CLIP text truncated (%)"


class ClipWeightsUnavailableError(WeightsUnavailableError):
    """The scorer's open_clip weights could not be loaded (typically: offline, not cached); a RuntimeError
    that command-line entry points report as one line."""


@dataclass
class ScoreResult:
    """Per-pair cosine similarities, CLIPScores (0-100) and whether the caption was truncated."""

    cosine: torch.Tensor  # (n,) float
    clip_score: torch.Tensor  # (n,) float, 100 * max(cosine, 0)
    truncated: torch.Tensor  # (n,) bool

    @property
    def mean(self) -> float:
        """Mean CLIPScore over the pairs."""
        return float(self.clip_score.mean())

    @property
    def truncation_rate(self) -> float:
        """Fraction of captions longer than the text tower's context (0..1)."""
        return float(self.truncated.float().mean())

    def summary(self) -> dict[str, float]:
        """The mean CLIPScore and the truncation rate in percent, for a metrics table."""
        return {CLIPSCORE_KEY: self.mean, TRUNCATION_KEY: 100.0 * self.truncation_rate}


CLIPSCORE_FORMULA = "100 * max(cos, 0)"  # how reports name the formula of clip_score() below


def clip_score(cosine: torch.Tensor) -> torch.Tensor:
    """CLIPScore from image-text cosine similarities: ``100 * max(cos, 0)``, any shape and float dtype kept.

    The one home of the formula (Hessel et al. 2021 with w = 1 on a 0-100 scale; see the module docstring).
    """
    return 100.0 * cosine.clamp(min=0.0)


def score_embeddings(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                     truncated: torch.Tensor) -> ScoreResult:
    """Score pairs from L2-normalised (n, d) image and text embeddings and the (n,) bool truncation flags."""
    cosine = (image_embeddings * text_embeddings).sum(dim=-1)
    return ScoreResult(cosine=cosine, clip_score=clip_score(cosine), truncated=truncated)


class ClipScorer:
    """Embeds images and texts with an open_clip model (eval mode, no gradients) and scores pairs."""

    def __init__(self, model, preprocess, tokenizer, device: str | torch.device = "cpu", batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.context_length = int(getattr(tokenizer, "context_length", None) or model.context_length)

    @classmethod
    def from_open_clip(
        cls, name: str, pretrained: str | None = None, device: str | torch.device = "cpu"
    ) -> ClipScorer:
        """Load an open_clip model by name (with ``pretrained``: a tag or a local checkpoint file) or
        from ``local-dir:/path`` (open_clip_config.json with "model_cfg" plus a weights file).

        Weights are required: a randomly initialised scorer is refused. When they cannot be loaded
        (offline and not cached), ClipWeightsUnavailableError names the source and the local options.
        """
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, require_pretrained=True
            )
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # open_clip raises many types here; all mean "could not load"
            raise ClipWeightsUnavailableError(_load_failure_message(name, pretrained, exc)) from exc
        return cls(model, preprocess, tokenizer, device=device)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings, shape (n, d), float32 on CPU."""
        images = _non_empty(images, "images")
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start : start + self.batch_size]])
            chunks.append(self.model.encode_image(batch.to(self.device)).float().cpu())
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised text embeddings (n, d) and a bool tensor (n,) marking truncated texts."""
        texts = _non_empty(texts, "texts")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
        chunks, flags = [], []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            flags.append(self._truncated(batch))
            tokens = self.tokenizer(batch, context_length=self.context_length)
            chunks.append(self.model.encode_text(tokens.to(self.device)).float().cpu())
        return F.normalize(torch.cat(chunks), dim=-1), torch.cat(flags)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> ScoreResult:
        """Score ``images[i]`` against ``texts[i]``."""
        if len(images) != len(texts):
            raise ValueError(f"images and texts differ in length: {len(images)} vs {len(texts)}")
        return score_embeddings(self.embed_images(images), *self.embed_texts(texts))

    def _truncated(self, texts: list[str]) -> torch.Tensor:
        # Tokenize with one extra slot: a text fits iff that slot is still padding. This works for
        # every open_clip tokenizer, which all pad on the right (SimpleTokenizer pads with 0).
        longer = self.tokenizer(texts, context_length=self.context_length + 1)
        pad_id = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None)
        return longer[:, -1] != (0 if pad_id is None else pad_id)


def score_image_files(scorer: ClipScorer, images: Sequence[Path], texts: Sequence[str],
                      batch_size: int = 64) -> list[float]:
    """CLIPScore (0-100) of ``texts[i]`` against the image file ``images[i]``.

    Images are decoded as every path decodes them (:func:`altogether.data.images.load_image`), a batch at a time
    so memory stays flat on large files; a file listed several times in a batch is decoded once. An unreadable
    image raises :class:`~altogether.data.records.BadRecord` naming the file.
    """
    from .data.images import load_image

    scores: list[float] = []
    for start in range(0, len(images), batch_size):
        files = list(images[start : start + batch_size])
        opened = {path: load_image(path) for path in dict.fromkeys(files)}
        scores.extend(scorer.score([opened[path] for path in files],
                                   list(texts[start : start + batch_size])).clip_score.tolist())
    return scores


def _non_empty(items: Sequence, name: str) -> list:
    items = list(items)
    if not items:
        raise ValueError(f"{name} is empty: nothing to embed")
    return items


def _load_failure_message(name: str, pretrained: str | None, exc: Exception) -> str:
    import open_clip

    if name.startswith("local-dir:"):
        source = f"the folder {name[len('local-dir:'):]!r} (open_clip_config.json + a weights file)"
    elif pretrained is None:
        source = "nowhere: no `pretrained` tag or file was given, and a scorer with random weights is refused"
    else:
        tag = open_clip.get_pretrained_cfg(name, pretrained)
        if tag.get("hf_hub"):
            source = f"the Hugging Face Hub repo {tag['hf_hub'].rstrip('/')!r} (tag {pretrained!r})"
        elif tag.get("url"):
            source = f"{tag['url']} (tag {pretrained!r})"
        else:
            source = f"the file {pretrained!r}"
    return (
        f"could not load open_clip model {name!r} with weights from {source}: {exc}. "
        "Offline, provide the weights locally: pass a checkpoint file path as `pretrained` "
        "(e.g. pretrained='/path/open_clip_model.safetensors'), or a folder holding "
        "open_clip_config.json and the weights as name='local-dir:/path/to/folder'"
    )
