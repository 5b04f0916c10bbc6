"""The Altogether captioner: frozen open_clip image encoder -> ClipCap mapper -> causal LM decoder.

Read top to bottom: the encoder (frozen, pooled L2-normalised embedding), the mapper (embedding -> visual
tokens), and :class:`AltogetherModel`, which places the visual tokens in front of the alt-text and caption
tokens laid out by :mod:`altogether.layout` and either computes the caption loss or generates a caption.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from .config import DecoderConfig, EncoderConfig, MapperConfig, ModelConfig
from .generation import GenerationConfig, decode, stream_seed
from .layout import Batch, SampleTokens, block_causal_mask, collate

log = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded (typically: offline and not in a local cache)."""


# ---------------------------------------------------------------------------------------------------------
# Frozen image encoder
# ---------------------------------------------------------------------------------------------------------


# model.encoder.resize_mode in open_clip's PreprocessCfg vocabulary.
OPEN_CLIP_RESIZE_MODES = {"squash": "squash", "pad": "longest", "crop": "shortest"}
PAD_FILL = 255  # pad with white: transparency is matted onto white too, and img2dataset's border mode pads white


def create_open_clip(cfg: EncoderConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable]:
    """The whole open_clip model (both towers) and its evaluation transform, with a clear error offline.

    The transform is open_clip's own (``image_transform_v2``, as ``create_model_and_transforms`` builds it) with
    the model's size, mean, std and interpolation and ``cfg.resize_mode``'s resize: PIL RGB image -> (3, S, S)
    float tensor. The model's own ``preprocess_cfg`` is left as open_clip configured it.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    try:
        model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained, device=device)
    except (RuntimeError, OSError, ValueError) as err:
        source = f"open_clip model {cfg.name!r} with pretrained={cfg.pretrained!r}"
        raise WeightsUnavailableError(
            f"could not load {source}: {err}. Weights for an open_clip tag are downloaded on first use; offline, "
            "give a local copy instead: model.encoder.pretrained=/path/to/open_clip_pytorch_model.bin (same "
            "architecture name), or model.encoder.name=local-dir:/folder holding open_clip_config.json and the "
            "weights, or set HF_HOME to a cache that already holds them."
        ) from err
    resize = {"resize_mode": OPEN_CLIP_RESIZE_MODES[cfg.resize_mode], "fill_color": PAD_FILL}
    preprocess = image_transform_v2(PreprocessCfg(**{**model.visual.preprocess_cfg, **resize}), is_train=False)
    return model, preprocess


def save_open_clip_dir(directory: str | Path, state_dict: dict[str, torch.Tensor] | None, model_cfg: dict[str, Any],
                      preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Write an open_clip ``local-dir:`` folder (``open_clip_config.json`` + safetensors weights, if given)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    if state_dict is not None:
        weights = {k: v.detach().contiguous() for k, v in state_dict.items()}
        save_file(weights, str(directory / "open_clip_model.safetensors"))
    return directory


class ImageEncoder(nn.Module):
    """The image tower of an open_clip model, frozen: eval mode, no gradients, never trained or exported."""

    def __init__(self, visual: nn.Module, embed_dim: int):
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        self.embed_dim = embed_dim

    @classmethod
    def from_config(cls, cfg: EncoderConfig, device: str | torch.device = "cpu") -> tuple["ImageEncoder", Callable]:
        """Build the encoder and return it with the image transform every path uses."""
        clip, preprocess = create_open_clip(cfg, device)
        visual = clip.visual
        embed_dim = getattr(visual, "output_dim", None) or clip.text_projection.shape[-1]
        return cls(visual, int(embed_dim)), preprocess

    def train(self, mode: bool = True) -> "ImageEncoder":
        # Lightning calls .train() on the whole module each epoch; the frozen encoder must stay in eval mode
        # (no dropout, no patch dropout, frozen norm statistics).
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.visual(pixel_values)
        if isinstance(embeds, (tuple, list)):  # towers that also return tokens
            embeds = embeds[0]
        return F.normalize(embeds.float(), dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Mapper
# ---------------------------------------------------------------------------------------------------------


class MapperAttention(nn.Module):
    """Multi-head self-attention as ClipCap's: queries, keys and values without bias, output projection with bias."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"mapper width {width} is not a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(width, width, bias=False)
        self.key_value = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # (batch, tokens, width)
        q = self.query(x).view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (b, heads, n, c/heads)
        # (b, n, 2 * width) -> (b, n, 2, heads, c/heads) -> (2, b, heads, n, c/heads): ClipCap's key/value layout
        k, v = self.key_value(x).view(b, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c/heads)) v, every token sees every token
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class MapperBlock(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm1(x))``, then ``x + fc2(relu(fc1(norm2(x))))``."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = MapperAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)
        self.dropout = nn.Dropout(dropout)  # where ClipCap's MLP has it: after the ReLU and after fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        hidden = self.dropout(F.relu(self.fc1(self.norm2(x))))  # (b, n, width * mlp_ratio)
        return x + self.dropout(self.fc2(hidden))


class Mapper(nn.Module):
    """ClipCap's transformer mapper (Mokady et al. 2021, ``TransformerMapper`` in rmokady/CLIP_prefix_caption).

    The (batch, embed_dim) image embedding is mapped linearly to ``num_visual_tokens`` vectors of the decoder's
    width, as many learned constant tokens (initialised N(0, 1), as ClipCap's) are appended, ``num_layers``
    pre-norm layers run over all 2 x ``num_visual_tokens`` tokens with no final norm, and the outputs at the
    constants' places are the (batch, num_visual_tokens, width) visual tokens fed to the decoder.
    At the paper's size (1024 -> 40 x 2048, 8 layers, 8 heads, MLP ratio 2) it has 352,616,448 parameters.
    """

    def __init__(self, embed_dim: int, width: int, cfg: MapperConfig):
        super().__init__()
        self.num_tokens = cfg.num_visual_tokens
        self.width = width
        self.project = nn.Linear(embed_dim, cfg.num_visual_tokens * width)
        self.constant = nn.Parameter(torch.randn(cfg.num_visual_tokens, width))
        self.layers = nn.ModuleList(
            MapperBlock(width, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.num_layers)
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        batch = image_embeds.shape[0]
        mapped = self.project(image_embeds).view(batch, self.num_tokens, self.width)  # (b, tokens, width)
        x = torch.cat([mapped, self.constant.expand(batch, -1, -1).to(mapped.dtype)], dim=1)  # (b, 2 tokens, width)
        for layer in self.layers:
            x = layer(x)
        return x[:, self.num_tokens :]


# ---------------------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------------------


def choose_attn_implementation(requested: str, device: str | torch.device) -> str:
    """``flash_attention_2`` only when flash_attn imports and the model runs on CUDA, else ``sdpa``."""
    if requested != "auto":
        return requested
    on_cuda = torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def load_tokenizer(cfg: DecoderConfig):
    """The decoder's tokenizer; a pad token is added as EOS when the tokenizer has none (masks hide it)."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise WeightsUnavailableError(
            f"could not load the tokenizer {source!r}: {err}. Offline, download it where you have network and "
            "set model.decoder.tokenizer=/local/folder (or model.decoder.name_or_path)."
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_decoder(
    cfg: DecoderConfig,
    *,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    load_weights: bool = True,
) -> nn.Module:
    """A Hugging Face causal LM: pretrained from ``name_or_path``, or random from ``cfg.config``.

    ``vocab_size`` is the tokenizer's size. The decoder keeps its own vocabulary size (``facebook/opt-1.3b``: 50272
    embedding rows for 50265 tokens); a ``cfg.config`` that names none takes the tokenizer's. The embeddings are
    never shrunk, and grow (with a warning) only when the tokenizer has more tokens than the decoder has rows.
    ``dtype``: float32 unless asked, whatever dtype the checkpoint's config.json names (OPT's says float16, and
    transformers 5 loads that when given none): training keeps fp32 master weights and leaves mixed precision to
    the trainer; inference asks for its dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = choose_attn_implementation(cfg.attn_implementation, device)
    if cfg.config is not None or not load_weights:
        if cfg.config is not None:
            # Plain containers all the way down: transformers checks nested values such as label2id for dict.
            hf_config = OmegaConf.to_container(OmegaConf.create(dict(cfg.config)))
            model_type = hf_config.pop("model_type", None)
            if model_type is None:
                raise ValueError("model.decoder.config needs a 'model_type' (e.g. 'opt')")
            if vocab_size is not None:
                hf_config.setdefault("vocab_size", vocab_size)
            config = AutoConfig.for_model(model_type, **hf_config)
        else:
            config = _pretrained_config(cfg.name_or_path)
        config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, attn_implementation=attn)
        except (OSError, ValueError) as err:
            raise WeightsUnavailableError(
                f"could not load decoder weights {cfg.name_or_path!r} (a Hugging Face Hub id or local folder). "
                f"Offline, download it where you have network (`hf download {cfg.name_or_path} --local-dir DIR`) "
                "and set model.decoder.name_or_path=DIR, or set HF_HOME to a cache that holds it. Cause: "
                + " ".join(str(err).split())
            ) from err
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size is not None and vocab_size > rows:
        log.warning("decoder %r has %d embedding rows but its tokenizer %d tokens: growing the embeddings and LM "
                    "head to %d rows (the new rows start untrained)", cfg.name_or_path if cfg.config is None else
                    "model.decoder.config", rows, vocab_size, vocab_size)
        model.resize_token_embeddings(vocab_size)
    return model.to(device)


def _pretrained_config(name_or_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise WeightsUnavailableError(f"could not load the decoder config {name_or_path!r}: {err}") from err


def causal_lm(decoder: nn.Module) -> nn.Module:
    """The Hugging Face model under a possible peft wrapper."""
    return decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder


# ---------------------------------------------------------------------------------------------------------
# The captioner
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CaptionLoss:
    """Mean cross-entropy over caption + EOS tokens, and how many tokens it averaged."""

    loss: torch.Tensor
    num_tokens: int


class AltogetherModel(nn.Module):
    """Encoder (frozen) -> mapper -> decoder, over the layout of :mod:`altogether.layout`."""

    def __init__(self, encoder: ImageEncoder | None, mapper: Mapper, decoder: nn.Module, pad_id: int, eos_id: int):
        super().__init__()
        self.encoder = encoder
        self.mapper = mapper
        self.decoder = decoder
        self.pad_id = pad_id
        self.eos_id = eos_id

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        tokenizer,
        *,
        device: str | torch.device = "cpu",
        load_weights: bool = True,
        with_encoder: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> tuple["AltogetherModel", Callable | None]:
        """Build the captioner (and the image transform) from a model config and its tokenizer.

        ``with_encoder=False`` builds a model that consumes cached image embeddings only. ``dtype`` is the mapper's
        and decoder's (float32 for training, see :func:`build_decoder`).
        """
        encoder, preprocess = ImageEncoder.from_config(cfg.encoder, device) if with_encoder else (None, None)
        decoder = build_decoder(cfg.decoder, vocab_size=len(tokenizer), device=device, dtype=dtype,
                                load_weights=load_weights)
        width = decoder.get_input_embeddings().embedding_dim
        embed_dim = encoder.embed_dim if encoder is not None else _encoder_embed_dim(cfg.encoder)
        mapper = Mapper(embed_dim, width, cfg.mapper).to(device=device, dtype=dtype)
        model = cls(encoder, mapper, decoder, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
        return model, preprocess

    def train(self, mode: bool = True) -> "AltogetherModel":
        """Train mode for what trains (mapper, decoder and its LoRA adapter); a decoder with nothing to train stays in
        eval mode, as ClipCap keeps its frozen language model, and so does the frozen encoder."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.decoder.parameters()):
            self.decoder.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Mapper and decoder weights: what an export stores (the frozen encoder is referenced, not copied)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    # -- embeddings ------------------------------------------------------------------------------------

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(images, 3, H, W)`` pixels -> ``(images, embed_dim)`` L2-normalised embeddings of the frozen encoder."""
        if self.encoder is None:
            raise RuntimeError("this model was built without an image encoder: pass image_embeds instead")
        return self.encoder(pixel_values)

    def input_embeddings(self, batch: Batch, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the mapper's visual tokens written at the ``visual_index`` positions.

        ``batch["input_ids"]``: ``(rows, width)``; ``image_embeds``: ``(images, embed_dim)`` in layout order.
        Returns ``(rows, width, hidden)`` in the decoder's embedding dtype.
        """
        embed = causal_lm(self.decoder).get_input_embeddings()
        tokens = embed(batch["input_ids"])
        visual = self.mapper(image_embeds.to(tokens.dtype)).to(tokens.dtype)
        # Each row has exactly num_visual_tokens marked positions, so the flattened order matches.
        flat = tokens.flatten(0, 1).index_copy(0, batch["visual_index"], visual.flatten(0, 1))
        return flat.view_as(tokens)

    def _image_embeds(self, batch: Batch) -> torch.Tensor:
        if "image_embeds" in batch:
            return batch["image_embeds"]
        return self.embed_images(batch["pixel_values"])

    # -- training --------------------------------------------------------------------------------------

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Last hidden states ``(rows, width, hidden)`` of the decoder for a laid-out :class:`~altogether.layout.Batch`
        holding ``pixel_values`` ``(images, 3, H, W)`` or ``image_embeds`` ``(images, embed_dim)``.

        Attention stays inside each sample: a block-diagonal causal mask built from ``segment_ids`` (packed
        batches) or the attention mask, or, for flash-attention, no mask and the variable-length arguments
        (``cu_seq_lens``/``max_seq_len`` from :func:`~altogether.layout.sequence_runs` when the batch carries
        them, else flash-attention infers them from the restarting position ids). The explicit mask also keeps
        Hugging Face from checking on the device whether the padding mask can be dropped. Eager attention adds its
        mask to the scores, so it gets the additive form (0 where attended, the dtype's minimum elsewhere).
        """
        lm = causal_lm(self.decoder)
        embeds = self.input_embeddings(batch, self._image_embeds(batch))
        attn = getattr(lm.config, "_attn_implementation", "")
        varlen: dict[str, Any] = {}
        if "flash" in attn:
            mask = None
            if "cu_seq_lens" in batch:
                varlen = {"cu_seq_lens_q": batch["cu_seq_lens"], "cu_seq_lens_k": batch["cu_seq_lens"],
                          "max_length_q": batch["max_seq_len"], "max_length_k": batch["max_seq_len"]}
        else:
            mask = block_causal_mask(batch.get("segment_ids", batch["attention_mask"]))
            if attn == "eager":
                mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=mask.device).masked_fill_(
                    ~mask, torch.finfo(embeds.dtype).min)
        out = lm.base_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=batch["position_ids"],
            use_cache=False,
            **varlen,
        )
        return out.last_hidden_state

    def forward(self, batch: Batch) -> CaptionLoss:
        """Caption loss: a scalar float32 mean over the ``num_tokens`` caption + EOS tokens of the batch.

        The LM head runs only at the ``predict_index`` positions, ``(num_tokens, hidden)``, never ``(rows, width)``.
        """
        token_losses, _ = self.token_losses(batch)
        num_tokens = token_losses.shape[0]  # known on the host: the index was built by the collate function
        return CaptionLoss(token_losses.sum() / max(num_tokens, 1), num_tokens)

    def token_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of every caption/EOS token, ``(num_tokens,)`` float32 in nats, and the ``(row, position)``
        it was predicted at, ``(num_tokens, 2)`` long."""
        hidden = self.hidden_states(batch)
        index = batch["predict_index"]
        targets = batch["labels"].flatten().index_select(0, index + 1)
        logits = causal_lm(self.decoder).get_output_embeddings()(hidden.flatten(0, 1).index_select(0, index))
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        width = batch["labels"].shape[1]
        return losses, torch.stack([index // width, index % width], dim=1)

    def logits(self, batch: Batch) -> torch.Tensor:
        """Full-vocabulary logits ``(rows, width, vocab)`` at every position (tests and analysis; training uses
        :meth:`forward`)."""
        return causal_lm(self.decoder).get_output_embeddings()(self.hidden_states(batch))

    # -- generation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        image_embeds: torch.Tensor,
        alt_ids: Sequence[list[int]],
        generation: GenerationConfig,
        *,
        stream_keys: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Generate caption token ids (EOS and anything after removed) for a batch of images and prompts.

        ``image_embeds``: ``(images, embed_dim)``; ``alt_ids``: one prompt's token ids per image (``images`` lists
        of at most ``max_alt_tokens`` ints, then the layout's ``prompt_end``'s). Prompts are
        left-padded so every row continues from its last prompt token, with the position ids the training
        layout gives. Greedy decoding and sampling run :func:`altogether.generation.decode`, where finished
        captions leave the batch; beam search (``num_beams > 1``) runs Hugging Face ``generate``. With
        ``generation.seed`` set, candidate ``k`` of image ``i`` samples from its own stream,
        ``stream_seed(seed, stream_keys[i], k)`` (default key: ``i``), whatever else is in the batch; without a
        seed, sampling draws from torch's global generator.
        Returns ``len(alt_ids) * num_return_sequences`` lists, the candidates of one image consecutive.
        """
        g = generation
        batch = collate(
            [SampleTokens(list(ids), []) for ids in alt_ids],
            num_visual_tokens=self.mapper.num_tokens,
            pad_id=self.pad_id,
            padding_side="left",
        )
        batch = Batch(**{k: v.to(image_embeds.device) for k, v in batch.items()})
        embeds, mask = self.input_embeddings(batch, image_embeds), batch["attention_mask"]
        lm = causal_lm(self.decoder)
        seeds = None
        if g.do_sample and g.seed is not None:
            keys = range(len(alt_ids)) if stream_keys is None else stream_keys
            seeds = [[stream_seed(g.seed, key, k) for k in range(g.num_return_sequences)] for key in keys]
        if g.num_beams > 1:
            rows = self._beam_search(lm, embeds, mask, g, seeds)
        else:
            generators = None
            if seeds is not None:
                generators = [torch.Generator(embeds.device).manual_seed(s) for image in seeds for s in image]
            rows = decode(
                lm, embeds.repeat_interleave(g.num_return_sequences, dim=0),
                mask.repeat_interleave(g.num_return_sequences, dim=0), max_new_tokens=g.max_new_tokens,
                eos_id=self.eos_id, pad_id=self.pad_id, do_sample=g.do_sample,
                processors=g.logits_processors(self.eos_id), generators=generators,
            ).tolist()
        return [_until_eos(row, self.eos_id) for row in rows]

    def _beam_search(self, lm: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, g: GenerationConfig,
                     seeds: list[list[int]] | None) -> list[list[int]]:
        """Hugging Face ``generate`` with beams; seeded beam sampling runs one image at a time, each from its
        own seed, so that its captions do not depend on the batch."""
        sampling = {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k} if g.do_sample else {}
        kwargs = dict(
            max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens, do_sample=g.do_sample,
            num_beams=g.num_beams, num_return_sequences=g.num_return_sequences,
            repetition_penalty=g.repetition_penalty, no_repeat_ngram_size=g.no_repeat_ngram_size,
            length_penalty=g.length_penalty, exponential_decay_length_penalty=g.length_decay,
            pad_token_id=self.pad_id, eos_token_id=self.eos_id, **sampling,
        )
        if seeds is None:
            return lm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs).tolist()
        rows: list[list[int]] = []
        for i, image_seeds in enumerate(seeds):
            with torch.random.fork_rng(devices=[embeds.device] if embeds.device.type == "cuda" else []):
                torch.manual_seed(image_seeds[0])
                rows += lm.generate(inputs_embeds=embeds[i : i + 1], attention_mask=mask[i : i + 1], **kwargs).tolist()
        return rows


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _encoder_embed_dim(cfg: EncoderConfig) -> int:
    """Embedding size from the open_clip config alone (for models fed cached embeddings)."""
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {cfg.name!r}")
    return int(model_cfg["embed_dim"])
