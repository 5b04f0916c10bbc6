"""Tiny stand-ins with random weights, for tests, benchmarks and CPU smoke runs.

Two kinds. Built from configs (:func:`tiny_opt_config`, :func:`write_tiny_clip`, :func:`write_tokenizer`):
fast, for unit tests. Shaped like the Hub and the corpora (:func:`write_hub_world`): what a user downloads,
file for file and field for field, with only the sizes shrunk, for every loading path and the end-to-end
journey. The architecture is the real one in both (open_clip ViT, the mapper, OPT decoder).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image, ImageDraw

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


def write_tiny_clip(directory: str | Path, *, seed: int = 0, model_cfg: dict[str, Any] | None = None,
                    preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """An open_clip local-dir with seeded random weights (the same folder loads to the same encoder)."""
    import open_clip

    model_cfg = model_cfg or TINY_CLIP
    preprocess_cfg = preprocess_cfg or CLIP_PREPROCESS
    torch.manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_open_clip_dir(directory, None, model_cfg, preprocess_cfg)  # config first: create_model reads it
    model = open_clip.create_model(f"local-dir:{directory}", pretrained=None)
    return save_open_clip_dir(directory, model.state_dict(), model_cfg, preprocess_cfg)


def write_tokenizer(directory: str | Path, texts: Iterable[str], vocab_size: int = 400,
                    words: Sequence[str] = ()) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` (merges only inside ``words`` when given; see
    :func:`~altogether.tokenizer.train_tokenizer`) and save it as a Hugging Face tokenizer folder."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, words=words)
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


# ---------------------------------------------------------------------------------------------------------
# A world shaped like the Hub and the corpora
# ---------------------------------------------------------------------------------------------------------

# facebook/opt-1.3b's config.json on the Hub, field for field. Note `torch_dtype: float16` (the checkpoint's
# dtype, which transformers 5 loads in when no dtype is asked for), `dropout: 0.1`, and 50272 embedding rows
# for a tokenizer of 50265 tokens.
OPT_1_3B_CONFIG: dict[str, Any] = {
    "_name_or_path": "facebook/opt-1.3b", "activation_dropout": 0.0, "activation_function": "relu",
    "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": True,
    "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 8192, "hidden_size": 2048, "init_std": 0.02, "layerdrop": 0.0,
    "max_position_embeddings": 2048, "model_type": "opt", "num_attention_heads": 32, "num_hidden_layers": 24,
    "pad_token_id": 1, "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.21.0.dev0",
    "use_cache": True, "vocab_size": 50272, "word_embed_proj_dim": 2048,
}
OPT_1_3B_TOKENIZER_SIZE = 50265
# Its generation_config.json, special_tokens_map.json and tokenizer_config.json. OPT's tokenizer is GPT-2's
# byte-level BPE (vocab.json + merges.txt) with fairseq's first ids <s> 0, <pad> 1, </s> 2, <unk> 3; </s> is its
# BOS, EOS and UNK token, and it prepends BOS (`add_bos_token`).
OPT_GENERATION_CONFIG: dict[str, Any] = {"_from_model_config": True, "bos_token_id": 2, "eos_token_id": 2,
                                         "pad_token_id": 1, "transformers_version": "4.27.0.dev0"}
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
_OPT_TOKEN = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
OPT_SPECIAL_TOKENS_MAP: dict[str, Any] = {
    "bos_token": {"content": "</s>", **_OPT_TOKEN}, "eos_token": {"content": "</s>", **_OPT_TOKEN},
    "pad_token": {"content": "<pad>", **_OPT_TOKEN}, "unk_token": {"content": "</s>", **_OPT_TOKEN},
}
OPT_TOKENIZER_CONFIG: dict[str, Any] = {
    "errors": "replace",
    **{k: {**v, "__type": "AddedToken"} for k, v in OPT_SPECIAL_TOKENS_MAP.items()},
    "add_prefix_space": False, "add_bos_token": True, "special_tokens_map_file": None,
    "name_or_path": "patrickvonplaten/opt-30b",
}
# What the Hub-shaped decoder shrinks, and nothing else. The vocabulary keeps the real model's 7 spare rows.
TINY_OPT_SHAPE = {"hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 256, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "vocab_size": 512}
TINY_OPT_TOKENIZER_SIZE = TINY_OPT_SHAPE["vocab_size"] - (OPT_1_3B_CONFIG["vocab_size"] - OPT_1_3B_TOKENIZER_SIZE)

# ViT-H-14-quickgelu (open_clip's config for MetaCLIP ViT-H/14) with width and depth shrunk: same image size,
# patch size, QuickGELU and 1024-d embedding, so the transform and the mapper's input are the real ones.
TINY_VIT_H_14 = {
    "embed_dim": 1024, "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
TINY_VIT_H_14_NAME = "altogether-tiny-ViT-H-14-quickgelu"
# What open_clip's save_config_for_hf writes for MetaCLIP: the OpenAI CLIP normalisation.
OPENAI_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
OPEN_CLIP_BIN = "open_clip_pytorch_model.bin"

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")
_SYLLABLES = ("ka", "zo", "ri", "ven", "tal", "mor", "bi", "lux", "dra", "pe", "sun", "qua", "fen", "ol", "tri")


def draw_shape(colour: str, shape: str, size: int = 32, seed: int = 0) -> Image.Image:
    """A coloured square or circle on white, slightly jittered by ``seed``; ``size`` in pixels."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    o = rng.randint(2, 6) * size // 32
    box = (o, o, size - o, size - o)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLOURS[colour])
    return img


def architecture(hub_config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a Hub ``config.json`` that define the model, ``model_type`` included: what
    ``model.decoder.config`` takes. File metadata and the checkpoint's dtype are left out."""
    metadata = ("_name_or_path", "architectures", "transformers_version", "torch_dtype")
    return {k: v for k, v in hub_config.items() if k not in metadata}


def write_opt_folder(directory: str | Path, texts: Iterable[str], *, seed: int = 0) -> Path:
    """A folder shaped like ``facebook/opt-1.3b``: load it with ``model.decoder.name_or_path=<folder>``.

    ``config.json`` is :data:`OPT_1_3B_CONFIG` with :data:`TINY_OPT_SHAPE` applied (float16, dropout 0.1,
    pad/bos/eos 1/2/2 kept); random weights saved by ``save_pretrained`` in float16; OPT's tokenizer files
    (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) with a byte-level BPE
    of :data:`TINY_OPT_TOKENIZER_SIZE` tokens trained on ``texts`` (fewer if ``texts`` has fewer pairs to merge),
    so that, as in the real model, the embedding has more rows than the tokenizer has tokens.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hub_config = {**OPT_1_3B_CONFIG, **TINY_OPT_SHAPE}
    torch.manual_seed(seed)
    fields = architecture(hub_config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    model.to(torch.float16).save_pretrained(str(directory))
    # save_pretrained writes today's field names (`dtype`); the Hub's files are the ones users have.
    (directory / "config.json").write_text(json.dumps(hub_config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(OPT_GENERATION_CONFIG, indent=2) + "\n")

    bpe = train_tokenizer(texts, vocab_size=TINY_OPT_TOKENIZER_SIZE, special_tokens=OPT_SPECIAL_TOKENS)
    bpe.backend_tokenizer.model.save(str(directory))  # vocab.json + merges.txt, GPT-2's format
    (directory / "tokenizer_config.json").write_text(json.dumps(OPT_TOKENIZER_CONFIG, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(OPT_SPECIAL_TOKENS_MAP, indent=2) + "\n")
    return directory


def write_open_clip_repo(directory: str | Path, *, seed: int = 0) -> Path:
    """A folder shaped like an open_clip model repo on the Hub (MetaCLIP's are ``timm/vit_huge_patch14_clip_224.
    metaclip_2pt5b``): ``open_clip_config.json`` (``model_cfg`` :data:`TINY_VIT_H_14`, OpenAI normalisation),
    ``open_clip_model.safetensors`` and the same weights as ``open_clip_pytorch_model.bin``, as open_clip's
    ``save_for_hf`` writes them. Load with ``model.encoder.name=local-dir:<folder>``.
    """
    from safetensors.torch import load_file

    directory = write_tiny_clip(directory, seed=seed, model_cfg=TINY_VIT_H_14, preprocess_cfg=OPENAI_PREPROCESS)
    torch.save(load_file(str(directory / "open_clip_model.safetensors")), directory / OPEN_CLIP_BIN)
    return directory


def register_open_clip_arch(directory: str | Path, name: str = TINY_VIT_H_14_NAME,
                            model_cfg: dict[str, Any] | None = None) -> str:
    """Make ``name`` an open_clip model name (as ``ViT-H-14-quickgelu`` is) in this process, so that a checkpoint
    file loads the way users give one: ``model.encoder.name=<name> model.encoder.pretrained=<file>``.

    open_clip reads architectures from JSON files named after the model; this writes ``<directory>/<name>.json``
    and adds it with ``open_clip.add_model_config``. Other processes (data-loader workers do not build models;
    DDP ranks do) must register it again.
    """
    import open_clip

    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(model_cfg or TINY_VIT_H_14, indent=2))
    open_clip.add_model_config(path)
    return name


def made_up_words(count: int, seed: int = 0) -> list[str]:
    """``count`` pronounceable made-up words ("zoriven", "talmorbi", ...): names no real corpus holds."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(count)]


def web_uuid(url: str) -> str:
    """MetaCLIP's sample id: the first 24 hex digits of the SHA-224 of the URL (``metaclip/curation/parse_wat.py``)."""
    return hashlib.sha224(url.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class WebImage:
    """One made-up web image: its URL, sample id, drawing, alt-text, page title and annotated captions."""

    url: str
    uuid: str
    colour: str
    shape: str
    seed: int
    alt: str
    title: str | None
    round2: str
    round3: str

    def image(self, size: int = 64) -> Image.Image:
        return draw_shape(self.colour, self.shape, size=size, seed=self.seed)

    @property
    def texts(self) -> list[list[str]]:
        """MetaCLIP's ``texts``: ``[source, text]`` pairs, the alt-text then the page title when there is one."""
        return [["alt", self.alt]] + ([["title", self.title]] if self.title else [])


def web_images(count: int, seed: int = 0, site: str = "shop.example.com") -> list[WebImage]:
    """``count`` made-up web images: a coloured shape whose alt-text names a product the pixels cannot show,
    a page title on every other image, and round-2 / round-3 style captions (the product name carried over)."""
    rng = random.Random(seed)
    names = made_up_words(count, seed)
    out = []
    for i, name in enumerate(names):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        product = f"{name.capitalize()} K-{rng.randint(10, 99)}"
        url = f"https://{site}/images/{name}-{i}.jpg"
        out.append(WebImage(
            url=url, uuid=web_uuid(url), colour=colour, shape=shape, seed=seed * 100_003 + i,
            alt=f"{product} for sale", title=f"IMG_{rng.randint(1000, 9999)}.jpg {product} | shop" if i % 2 else None,
            round2=f"a {colour} {shape} on a white background",
            round3=f"a photo of {product}: a {colour} {shape} on a white background",
        ))
    return out


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_metaclip_shards(root: str | Path, images: list[WebImage], *, shards: int = 2) -> list[Path]:
    """Tar shards laid out as MetaCLIP's data loaders read them (``src/training/data_metaclip.py``):
    ``<root>/<shard % 100>/<shard>.tar`` holding ``<uuid>.json`` then ``<uuid>.jpeg`` per sample, the JSON
    ``{"uuid", "url", "texts": [[source, text], ...]}`` with sources ``alt`` and ``title``. Returns the shard paths.
    """
    root = Path(root)
    paths = []
    for shard in range(shards):
        path = root / str(shard % 100) / f"{shard}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for item in images[shard::shards]:
                meta = {"uuid": item.uuid, "url": item.url, "texts": item.texts}
                _add_member(tar, f"{item.uuid}.json", json.dumps(meta).encode("utf-8"))
                _add_member(tar, f"{item.uuid}.jpeg", _jpeg(item.image()))
        paths.append(path)
    return paths


def write_altogether_ft(path: str | Path, images: list[WebImage], image_dir: str | Path) -> Path:
    """An Altogether-FT annotation file (``activebus/Altogether-FT``, ``altogether_ft_{train,eval}.json``):
    ``{"data": [{"alt", "round2", "round3", "url", "img_path", "source"}, ...]}``, with the images written to
    ``image_dir`` as ``<uuid>.jpg`` and ``img_path`` relative to it (``data.image_root=<image_dir>``).
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, item in enumerate(images):
        (image_dir / f"{item.uuid}.jpg").write_bytes(_jpeg(item.image()))
        records.append({"alt": item.alt, "round2": item.round2, "round3": item.round3, "url": item.url,
                        "img_path": f"{item.uuid}.jpg", "source": ("wit", "datacomp")[i % 2]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": records}))
    return path


@dataclass(frozen=True)
class HubWorld:
    """Paths of a Hub-shaped world (:func:`write_hub_world`) and the settings that point a recipe at them."""

    decoder: Path  # facebook/opt-1.3b-shaped folder: model.decoder.name_or_path
    encoder: Path  # open_clip Hub repo folder: model.encoder.name=local-dir:<encoder>
    encoder_arch: str  # a registered open_clip name, for the checkpoint-file form below
    encoder_checkpoint: Path  # model.encoder.name=<encoder_arch> model.encoder.pretrained=<encoder_checkpoint>
    shards: tuple[Path, ...]  # MetaCLIP-layout tar shards
    ft_train: Path  # Altogether-FT train JSON
    ft_eval: Path  # Altogether-FT eval JSON
    ft_images: Path  # data.image_root of both JSON files
    pretrain_images: tuple[WebImage, ...]
    ft_train_images: tuple[WebImage, ...]
    ft_eval_images: tuple[WebImage, ...]

    @property
    def shard_pattern(self) -> str:
        """A brace pattern naming exactly the shards (MetaCLIP's nested folders make a range impossible)."""
        root = self.shards[0].parent.parent
        return f"{root}/{{{','.join(str(p.relative_to(root).with_suffix('')) for p in self.shards)}}}.tar"

    def model_overrides(self) -> list[str]:
        """``key=value`` overrides that point a shipped recipe's model at this world's encoder and decoder."""
        return [f"model.encoder.name=local-dir:{self.encoder}", "model.encoder.pretrained=null",
                f"model.decoder.name_or_path={self.decoder}"]


def write_hub_world(root: str | Path, *, seed: int = 0, pretrain: int = 16, ft_train: int = 12,
                    ft_eval: int = 6) -> HubWorld:
    """Everything a user downloads for the journey, shaped as downloaded, sizes shrunk, under ``root``:
    ``opt-1.3b/`` (:func:`write_opt_folder`), ``metaclip-h14/`` (:func:`write_open_clip_repo`),
    ``metaclip/<shard % 100>/<shard>.tar`` (``pretrain`` images, :func:`write_metaclip_shards`) and
    ``altogether-ft/`` (:func:`write_altogether_ft`). The tokenizer is trained on the world's texts plus
    made-up words, so that it reaches its size.
    """
    root = Path(root)
    every = web_images(pretrain + ft_train + ft_eval, seed)
    pre, train, held_out = every[:pretrain], every[pretrain:pretrain + ft_train], every[pretrain + ft_train:]
    texts = [t for w in every for t in (w.alt, w.title or "", w.round2, w.round3)] + made_up_words(3000, seed + 1)
    encoder = write_open_clip_repo(root / "metaclip-h14", seed=seed)
    ft = root / "altogether-ft"
    return HubWorld(
        decoder=write_opt_folder(root / "opt-1.3b", texts, seed=seed),
        encoder=encoder,
        encoder_arch=register_open_clip_arch(root / "open_clip_configs"),
        encoder_checkpoint=encoder / OPEN_CLIP_BIN,
        shards=tuple(write_metaclip_shards(root / "metaclip", pre)),
        ft_train=write_altogether_ft(ft / "altogether_ft_train.json", train, ft / "images"),
        ft_eval=write_altogether_ft(ft / "altogether_ft_eval.json", held_out, ft / "images"),
        ft_images=ft / "images",
        pretrain_images=tuple(pre), ft_train_images=tuple(train), ft_eval_images=tuple(held_out),
    )
