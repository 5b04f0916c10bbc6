"""Cached image embeddings (``python -m altogether.cache_embeddings``): the frozen encoder runs once per image, training reads the vectors.

Because the encoder is frozen, its L2-normalised embedding of an image never changes; computing it once and
training from the vectors skips JPEG decoding and the encoder (Synth², training in embedding space). A cache
folder holds

```
cache.json                      encoder spec (resize policy included), data source, embedding size, number of
                                shards and records
embeddings-00000.safetensors    "embeddings": (n, d) float16 and "keys": the samples' keys as UTF-8 bytes
```
``python -m altogether.cache_embeddings recipe=NAME data.train=... cache_dir=PATH`` writes it;
``data.cache_dir=PATH`` makes training read it (keys must match the records' keys, and the recipe's encoder and
``model.encoder.resize_mode`` the cache's: a cache without a resize policy was made with ``crop``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .cli import setting
from .config import LEGACY_RESIZE_MODE
from .data.images import load_image
from .data.records import BadRecord, Record
from .io import atomic_write_text, replacing_dir

log = logging.getLogger(__name__)
META_FILE = "cache.json"


def _encode_keys(keys: Sequence[str]) -> torch.Tensor:
    blob = "\n".join(keys).encode("utf-8")
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)


def _decode_keys(tensor: torch.Tensor) -> list[str]:
    return bytes(tensor.tolist()).decode("utf-8").split("\n") if tensor.numel() else []


def write_cache(
    directory: str | Path,
    records: Iterable[Record],
    encoder,
    transform,
    *,
    encoder_spec: dict,
    source: str,
    batch_size: int = 64,
    shard_size: int = 100_000,
    device: str | torch.device = "cpu",
    skipped: list[str] | None = None,
    progress: bool = False,
) -> dict:
    """Embed every record's image and write the cache folder atomically; returns its ``cache.json`` content.

    ``records`` is consumed once, as a stream: memory holds one shard of vectors, never the records. Unreadable
    images are skipped and counted (``skipped`` in the metadata, with reasons for the first 100), as are the
    reasons in ``skipped`` passed in (records the reader could not read). A key seen twice, or no image embedded
    at all, is a ValueError and leaves ``directory`` as it was.
    """
    skipped = skipped if skipped is not None else []
    with replacing_dir(directory) as tmp:
        shard, keys, pixels = 0, [], []
        shard_keys: list[str] = []
        shard_vectors: list[torch.Tensor] = []
        seen: set[str] = set()
        total = 0

        def flush_batch() -> None:
            if pixels:
                with torch.no_grad():
                    shard_vectors.append(encoder(torch.stack(pixels).to(device)).to("cpu", torch.float16))
                shard_keys.extend(keys)
                keys.clear()
                pixels.clear()

        def flush_shard() -> None:
            nonlocal shard
            flush_batch()
            if shard_keys:
                save_file({"embeddings": torch.cat(shard_vectors), "keys": _encode_keys(shard_keys)},
                          str(tmp / f"embeddings-{shard:05d}.safetensors"))
                shard += 1
                shard_keys.clear()
                shard_vectors.clear()

        for record in tqdm(records, desc="cache_embeddings", unit="img", disable=not progress):
            if "\n" in record.key:
                raise ValueError(f"record key {record.key!r} contains a newline")
            if record.key in seen:  # training looks vectors up by key: a second image under it would be lost
                raise ValueError(f"record key {record.key!r} appears twice in {source}: keys must be unique")
            seen.add(record.key)
            try:
                pixels.append(transform(load_image(record.image, key=record.key)))
            except BadRecord as err:
                skipped.append(str(err))
                continue
            keys.append(record.key)
            total += 1
            if len(pixels) == batch_size:
                flush_batch()
            if len(shard_keys) + len(keys) >= shard_size:
                flush_shard()
        flush_shard()
        if total == 0:  # raised inside: the folder is not replaced by an empty cache
            raise ValueError(f"no image of {source} could be embedded ({len(skipped)} skipped"
                             + (f", e.g. {skipped[0]}" if skipped else "") + "); nothing was cached")
        meta = {"encoder": encoder_spec, "source": source, "dim": getattr(encoder, "embed_dim", None),
                "dtype": "float16", "shards": shard, "records": total, "skipped": len(skipped),
                "skipped_reasons": skipped[:100]}
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))
    if skipped:
        log.warning("cache: %d unreadable images skipped (see %s)", len(skipped), Path(directory) / META_FILE)
    return meta


class EmbeddingCache:
    """All vectors of a cache folder in memory (float16), looked up by sample key."""

    def __init__(self, directory: str | Path, *, expect_encoder: dict | None = None):
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no embedding cache at {directory} ({META_FILE} missing)")
        self.meta = json.loads(meta_path.read_text())
        if expect_encoder is not None and _spec(self.meta["encoder"]) != _spec(expect_encoder):
            raise ValueError(f"embedding cache {directory} was made with encoder {self.meta['encoder']}, "
                             f"but the recipe's encoder is {expect_encoder}")
        made = _resize_mode(self.meta["encoder"])
        if expect_encoder is not None and made != _resize_mode(expect_encoder):
            raise ValueError(f"embedding cache {directory} was made with model.encoder.resize_mode={made}, but the "
                             f"recipe has {_resize_mode(expect_encoder)}: rebuild the cache, or train with "
                             f"model.encoder.resize_mode={made}")
        vectors, self.index = [], {}
        for i in range(self.meta["shards"]):
            shard = load_file(str(directory / f"embeddings-{i:05d}.safetensors"))
            for key in _decode_keys(shard["keys"]):
                self.index[key] = len(self.index)
            vectors.append(shard["embeddings"])
        self.vectors = torch.cat(vectors) if vectors else torch.zeros(0, 0, dtype=torch.float16)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.vectors[self.index[key]]

    def attach(self, record: Record) -> Record:
        """``record`` carrying its cached embedding in ``extra["image_embeds"]`` (``(dim,)`` float16), so training
        skips decoding its image; :class:`BadRecord` when the cache has no vector for its key."""
        if record.key not in self.index:
            raise BadRecord(f"record {record.key!r} has no cached embedding")
        record.extra["image_embeds"] = self[record.key]
        return record


def _spec(encoder: dict) -> tuple:
    return encoder.get("name"), encoder.get("pretrained")


def _resize_mode(encoder: dict) -> str:
    return encoder.get("resize_mode", LEGACY_RESIZE_MODE)


class CachedSource(Sequence):
    """A record source whose records carry their cached embedding (``extra["image_embeds"]``).

    A record without a cached vector raises :class:`BadRecord`, so training skips and counts it.
    """

    def __init__(self, source: Sequence[Record], cache: EmbeddingCache):
        self.source, self.cache = source, cache

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Record:
        return self.cache.attach(self.source[index])


def iter_records(train: Sequence[Record] | None, val: Sequence[Record] | None, cfg, on_bad) -> Iterator[Record]:
    """Every record of a recipe's data, streamed: the table sources ``train`` and ``val`` in order, or
    ``cfg.data.train``'s tar shards when ``train`` is None (webdataset). A record that cannot be read goes to
    ``on_bad(reason)`` and is skipped."""
    from .data.datamodule import data_fields
    from .data.readers import iter_webdataset

    if train is None:
        yield from iter_webdataset(cfg.data.train, data_fields(cfg), on_bad=lambda key, reason: on_bad(
            reason if repr(key) in reason else f"sample {key!r}: {reason}"))
    for source in (train, val):
        for i in range(len(source) if source is not None else 0):
            try:
                yield source[i]
            except BadRecord as err:
                on_bad(str(err))


@dataclass
class CacheSettings:
    """The command's own ``key=value`` settings; every other ``key=value`` overrides the recipe."""

    recipe: str = setting(help="recipe name or YAML path whose data (and encoder) to cache")
    cache_dir: str = setting(help="folder the embedding shards are written to")
    batch_size: int = setting(64, "images per encoder call")


def main(argv: list[str]) -> int:
    """``altogether cache-embeddings recipe=NAME cache_dir=PATH [batch_size=64] [recipe key=value ...]``."""
    from .cli import command_usage, load_settings, split_args
    from .config import ConfigError, load_recipe, to_container
    from .data.datamodule import open_sources
    from .model import ImageEncoder

    if "-h" in argv or "--help" in argv:
        print(command_usage("altogether cache-embeddings", "cache image embeddings of a recipe's data; every other "
                    "key=value overrides the recipe", {}, CacheSettings))
        return 0
    positional, settings = split_args(argv)
    if positional:
        raise ConfigError(f"arguments must be key=value, got {' '.join(positional)!r}")
    own = [a for a in settings if a.split("=", 1)[0] in CacheSettings.__dataclass_fields__]
    s = load_settings(CacheSettings, own)
    cache_dir, batch_size = s.cache_dir, s.batch_size
    cfg = load_recipe(s.recipe, [a for a in settings if a not in own])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, transform = ImageEncoder.from_config(cfg.model.encoder, device)
    train, val = open_sources(cfg)
    skipped: list[str] = []
    records = iter_records(train, val, cfg, skipped.append)
    meta = write_cache(cache_dir, records, encoder, transform, encoder_spec=to_container(cfg.model.encoder),
                       source=str(cfg.data.train), batch_size=batch_size, device=device, skipped=skipped,
                       progress=sys.stderr.isatty())
    print(f"cached {meta['records']} embeddings ({meta['skipped']} skipped) in {meta['shards']} shard(s) at {cache_dir}")
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    sys.exit(run_cli(main))
