"""`sdxl encode`: VAE latents, SDXL text embeddings (and optional CLIP embeddings) into shards.

Reads bucket's plan. Items of one bucket are cut into shards of `shard_samples`; shards are the unit of work
of ranks (shard i belongs to rank i mod WORLD_SIZE) and of resumption. The sharded executor
(shared/core/sharded.py) runs the ranks: rank 0 prepares the layout (empty caption, zarr groups), every rank
encodes its unfinished shards, each finished shard is marked done, and rank 0 writes the index and the
manifest once every shard is marked. An item whose sample the previous output at `--out` already holds (same
image, crop, captions, model and options) is taken from there, so adding images encodes only what is new or
changed. See docs/encode.md for the arrays stored per sample.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from shared.core import artifacts, outputs, ranks, sharded
from shared.core.artifacts import Manifest
from shared.core.errors import ConfigError
from shared.core.faults import checkpoint
from shared.core.log import progress, say, table, warn
from shared.core.stage import BuildResult, Stage, execute
from shared.formats import plan as plans
from shared.formats import shards
from shared.formats.plan import PLAN, PlanRow
from shared.formats.samples import ENCODE_VERSION, ENCODER_PARTS, SAMPLES, EmptyCaption, Layout, Sample
from shared.formats.shard_index import FILE as INDEX, BucketEntry, Index, write_index
from shared.models import loading as models
from stages.encode import items, writer
from stages.encode.config import Config
from stages.encode.decode import dali_batches, pil_batches, resolve_decoder
from stages.encode.encoders import Encoders
from stages.encode.reuse import Previous, run_key, sample_key
from stages.encode.writer import Made, Shard, ShardRecord

__all__ = ["Config", "Encoders", "STAGE", "run", "repair"]
VERSION = ENCODE_VERSION


def _inputs(cfg: Config) -> dict:
    manifest = plans.require(cfg.input)
    identity = models.model_identity(cfg.model, ENCODER_PARTS, cfg.vae)
    decoder = resolve_decoder(cfg.decoder)
    return {"bucket": {"path": str(cfg.input), "fingerprint": manifest.fingerprint,
                       "what": "bucket plan changed"},
            "model": {"name": cfg.model, "vae": cfg.vae, "components": identity,
                      "fingerprint": artifacts.hash_json(identity), "what": f"weights of {cfg.model}"},
            "decoder": {"name": decoder, "fingerprint": decoder, "what": f"decoder is now {decoder}"},
            **_clip_input(cfg)}


def _clip_input(cfg: Config) -> dict:
    """With --clip, the CLIP model's identity (its files' hash; the builtin tiny CLIP's name)."""
    if not cfg.clip:
        return {}
    if cfg.clip_model is None:
        name, identity = "builtin tiny CLIP", f"{cfg.model}:tiny-clip"
    else:
        folder = Path(cfg.clip_model).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--clip-model {cfg.clip_model}: no such folder; expected a transformers CLIPModel "
                              f"folder (e.g. clip-vit-large-patch14)")
        name, identity = cfg.clip_model, models.component_identity(folder)
    return {"clip": {"name": name, "fingerprint": identity, "what": f"weights of {name}"}}


def _build(cfg: Config, staging: Path, inputs: dict) -> BuildResult | None:
    """prepare (rank 0) → encode this rank's shards → finish (rank 0), run by the sharded executor."""
    rank = ranks.current()
    rows = plans.read_plan(cfg.input)
    plan = writer.plan_shards(rows, cfg.shard_samples)
    enc = Encoders(cfg, ranks.device(cfg.device, rank.local))
    previous = Previous.open(cfg.output, cfg.reuse)  # read-only until commit replaces it
    run = run_key(cfg, inputs, artifacts.code_version(__name__), enc.numerics())
    records = sharded.run(staging, plan, prepare=lambda: _prepare(cfg, staging, plan, enc),
                          work=lambda todo: _encode(cfg, staging, todo, enc, rank, previous, run),
                          alive=_alive(cfg, rank), rank=rank, label="encode", noun="shards")
    if records is None:
        return None
    return _finish(cfg, staging, enc, [ShardRecord.from_json(r) for r in records], len(rows), previous)


def _alive(cfg: Config, rank: ranks.Rank) -> sharded.Alive:
    """Whether the given ranks of this job still hold their claim on the output (see shared/core/outputs.py)."""
    job = outputs.job_id(rank.world)
    return lambda owners: all(outputs.partner_alive(cfg.output, r, job) for r in owners)


def _layout(cfg: Config, enc: Encoders) -> Layout:
    return Layout(storage_dtype=cfg.storage_dtype, latent_channels=enc.latent_channels, scaling_factor=enc.scale,
                  te_dim=enc.te_dim, pooled_dim=enc.pooled_dim, variants=1 + cfg.caption_variants,
                  max_windows=cfg.max_windows, flip=cfg.flip, token_ids=cfg.token_ids, clip_dim=enc.clip_dim,
                  pixels=cfg.pixels, crops=cfg.crops_per_item)


def _prepare(cfg: Config, staging: Path, plan: list[Shard], enc: Encoders) -> None:
    (text,) = enc.texts([""])
    empty = EmptyCaption(text.hidden.astype(cfg.storage_dtype), text.pooled.astype(cfg.storage_dtype), text.ids)
    codecs = shards.zarr_codecs(cfg.zarr_compression, cfg.zarr_level) if cfg.zarr else None
    writer.prepare(staging, plan, _layout(cfg, enc), empty, codecs)


# ---------------------------------------------------------------- this rank's shards


def _encode(cfg: Config, staging: Path, todo: list[Shard], enc: Encoders, rank: ranks.Rank, previous: Previous,
            run: str) -> Iterator[tuple[Shard, dict]]:
    """Make the shards `todo` in order and yield each with its record: the items `previous` holds are taken
    from there, the others encoded in batches, one decode stream across the shards."""
    for s in todo:  # a shard killed half-way left at most a .partial file; it is redone from scratch
        (staging / (s.tar + ".partial")).unlink(missing_ok=True)
    keys = {r.id: sample_key(r, run) for s in todo for r in s.rows}
    batches = {s.name: _batches([r for r in s.rows if keys[r.id] not in previous], cfg.batch_size) for s in todo}
    decoded = _decoded(cfg, [b for s in todo for b in batches[s.name]], enc)
    total = sum(len(s.rows) for s in todo)
    bar = progress(range(total), total, "encode" if rank.world == 1 else f"encode rank {rank.rank}", "img")
    for shard in todo:
        made: dict[str, Made] = {}
        for rows in batches[shard.name]:
            made.update(_made(cfg, enc, rows, next(decoded), keys))
            checkpoint("encode.batch")
        taken = previous.take({r.id: keys[r.id] for r in shard.rows if r.id not in made})
        made.update({r.id: _reused(cfg, r, *taken[r.id], keys[r.id]) for r in shard.rows if r.id in taken})
        made.update(_encoded_now(cfg, enc, [r for r in shard.rows if r.id not in made], keys))
        record = writer.write_shard(staging, shard, [made[r.id] for r in shard.rows], cfg.wds, cfg.zarr, cfg.pixels)
        for _ in shard.rows:
            next(bar, None)
        yield shard, record.to_json()
    for _ in bar:  # close the bar
        pass


def _batches(rows: list[PlanRow], size: int) -> list[tuple[PlanRow, ...]]:
    return [tuple(rows[i:i + size]) for i in range(0, len(rows), size)]


def _made(cfg: Config, enc: Encoders, rows: tuple[PlanRow, ...], pixels: list[Any], keys: dict[str, str]) -> dict:
    return {r.id: Made(sample, keys[r.id], cut, False)
            for r, (sample, cut) in zip(rows, _encode_batch(cfg, enc, rows, pixels))}


def _reused(cfg: Config, row: PlanRow, stored: Sample, cut: int, key: str) -> Made:
    """A sample of the previous output, described as its item is now (items.described)."""
    variants = items.caption_variants(row, cfg.caption_variants, cfg.keep_tags, cfg.tag_join, cfg.seed)
    crops = items.extra_crops(row, cfg.crops_per_item, cfg.seed)
    return Made(items.described(row, variants, stored, crops), key, cut, True)


def _encoded_now(cfg: Config, enc: Encoders, rows: list[PlanRow], keys: dict[str, str]) -> dict[str, Made]:
    """Items the previous output was to give but could not (a shard that no longer checks out): encoded now,
    in their own decode stream."""
    batches = _batches(rows, cfg.batch_size)
    out: dict[str, Made] = {}
    for b, pixels in zip(batches, _decoded(cfg, batches, enc)):
        out.update(_made(cfg, enc, b, pixels, keys))
    return out


def _decoded(cfg: Config, batches: list[tuple[PlanRow, ...]], enc: Encoders) -> Iterator[list[Any]]:
    """Decoded pixels of each batch, in order (DALI or PIL workers running ahead): per batch, its planned crops
    then (crops_per_item > 1) its rows at each extra crop, as plan rows of that crop (decoded the same way)."""
    k = cfg.crops_per_item
    flat = [c for b in batches for c in _at_crops(b, k, cfg.seed)]
    on_gpu = enc.device.type == "cuda"
    if resolve_decoder(cfg.decoder) == "dali":
        stream = dali_batches(flat, cfg.batch_size, cfg.workers, enc.device.index if on_gpu else None)
    else:
        stream = pil_batches(flat, cfg.workers, pin=on_gpu)
    return iter(lambda: list(itertools.islice(stream, k)), [])


def _at_crops(rows: tuple[PlanRow, ...], crops: int, seed: int) -> list[tuple[PlanRow, ...]]:
    """The batch as planned, then its rows at each extra crop (items.extra_crops)."""
    moved = [[dataclasses.replace(r, crop=c) for c in items.extra_crops(r, crops, seed)] for r in rows]
    return [rows] + [tuple(m[j] for m in moved) for j in range(crops - 1)]


def _encode_batch(cfg: Config, enc: Encoders, rows: tuple[PlanRow, ...], crops: list[Any]
                  ) -> list[tuple[Sample, int]]:
    """Each row's sample and how many of its captions were cut at max_windows (`crops`: the batch's pixels at
    each of its crops, the planned one first)."""
    ids = [r.id for r in rows]
    pixels = crops[0]
    lat = enc.latents(pixels, ids)
    lat_flip = enc.latents(pixels, ids, flipped=True) if cfg.flip else None
    more = _crop_latents(cfg, enc, ids, crops[1:])
    variants = [items.caption_variants(r, cfg.caption_variants, cfg.keep_tags, cfg.tag_join, cfg.seed) for r in rows]
    flat = enc.texts([c for vs in variants for c in vs])
    clip = enc.clip_embeddings(pixels, [vs[0] for vs in variants]) if cfg.clip else None
    stored = pixels.cpu().numpy() if cfg.pixels != "none" else None   # the planned crops' pixels (--pixels)
    out, pos = [], 0
    for j, row in enumerate(rows):
        texts = flat[pos:pos + len(variants[j])]
        pos += len(variants[j])
        sample = items.pack_sample(row, lat[j], texts, cfg.storage_dtype,
                                   latent_flip=None if lat_flip is None else lat_flip[j], token_ids=cfg.token_ids,
                                   clip=None if clip is None else (clip[0][j], clip[1][j]),
                                   pixels=None if stored is None else stored[j],
                                   crops=items.extra_crops(row, cfg.crops_per_item, cfg.seed),
                                   latent_crops=None if more is None else more[0][:, j],
                                   latent_flip_crops=None if more is None or more[1] is None else more[1][:, j])
        out.append((sample, sum(t.truncated for t in texts)))
    return out


def _crop_latents(cfg: Config, enc: Encoders, ids: list[str], crops: list[Any]
                  ) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The extra crops' latents [crops, B, C, h, w] (and their mirror images' with flip); None without extra
    crops. A sampled latent's noise is seeded by item and crop."""
    if not crops:
        return None
    keyed = [[f"{i}:crop{k}" for i in ids] for k in range(1, len(crops) + 1)]
    lat = np.stack([enc.latents(p, names) for p, names in zip(crops, keyed)])
    flip = np.stack([enc.latents(p, names, flipped=True) for p, names in zip(crops, keyed)]) if cfg.flip else None
    return lat, flip


# ---------------------------------------------------------------- finish (rank 0)


def _finish(cfg: Config, staging: Path, enc: Encoders, records: list[ShardRecord], n_items: int,
            previous: Previous) -> BuildResult:
    """The index from the shards' records, once every shard is done."""
    by_bucket: dict[tuple[int, int], list] = {}
    tags: dict[str, int] = {}
    for r in records:
        by_bucket.setdefault(r.bucket, []).append(r.entry)
        for t, n in r.tags.items():
            tags[t] = tags.get(t, 0) + n
    index = Index(cfg.format, _layout(cfg, enc), tuple(BucketEntry(b, tuple(e)) for b, e in by_bucket.items()), tags)
    write_index(staging, index)
    checkpoint("encode.finish")
    truncated = sum(r.truncated_captions for r in records)
    if truncated:
        warn(f"{truncated} captions (counting variants) were longer than max_windows = {cfg.max_windows} windows "
             f"({cfg.max_windows * 75} tokens) and were cut")
    say(table(["bucket", "samples", "shards"], [[b.group, b.samples, len(b.shards)] for b in index.buckets]))
    reused = sum(r.reused for r in records)
    say(f"encode: {n_items - reused} of {n_items} items encoded, " +
        (f"{reused} reused from {previous.folder}" if reused else
         f"none reused ({previous.note or f'no sample of {previous.folder} matches'})"))
    extra: dict[str, Any] = {"shards": len(records), "truncated_captions": truncated, "reused": reused}
    if cfg.clip:
        extra["clip"] = _clip_summary(records)
    return BuildResult({"in": n_items, "out": index.samples, "dropped": {}}, extra)


def _clip_summary(records: list[ShardRecord]) -> dict:
    sims = [(sim, key) for r in records for sim, key in zip(r.clip_similarity or (), r.keys)]
    values = np.array([s for s, _ in sims], np.float64)
    lowest = sorted(sims)[:10]
    return {"mean": round(float(values.mean()), 6), "min": round(float(values.min()), 6),
            "p05": round(float(np.percentile(values, 5)), 6), "max": round(float(values.max()), 6),
            "lowest": [{"id": k, "similarity": s} for s, k in lowest]}


# ---------------------------------------------------------------- repair, interruption, safety


def repair(cfg: Config, staging: Path) -> None:
    """A damaged finished output moved back to staging: keep the marker of each shard whose tar and zarr rows
    still match its record, drop the others (and the index), so the build re-encodes only those."""
    (staging / INDEX).unlink(missing_ok=True)
    store = None
    if cfg.zarr:
        try:
            store = shards.open_store(staging / "zarr", mode="r")
        except Exception:  # noqa: BLE001 - any failure to open means the store must be rebuilt
            shutil.rmtree(staging / "zarr", ignore_errors=True)
            sharded.reset(staging)
            return
    markers = sharded.completed(staging)
    bad = [m for m in markers if not _intact(staging, m, store)]
    for m in bad:
        m.unlink()
    if bad:
        warn(f"encode: {len(bad)} of {len(markers)} shards damaged; re-encoding them")


def _intact(staging: Path, marker: Path, store: Any) -> bool:
    try:
        record = ShardRecord.from_json(json.loads(marker.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return writer.shard_intact(staging, record, store)


def _kept(staging: Path) -> str:
    return f"{len(sharded.completed(staging))} finished shards are kept in {staging}"


def _protected(cfg: Config) -> list[tuple[str, Path]]:
    return [("input folder", cfg.input)] + outputs.local_paths(
        {"model": cfg.model, "VAE": cfg.vae, "CLIP model": cfg.clip_model})


STAGE = Stage(name="encode", version=VERSION,
              module=__name__,
              out_dir=lambda cfg: cfg.output, inputs=_inputs, build=_build, resumable=True,
              protected=_protected, trees=("shards", "zarr"), repair=repair, kept=_kept, reads=(PLAN,),
              writes=(SAMPLES,))


def run(cfg: Config, force: bool = False) -> Manifest | None:
    """Encode the planned items into `<out>` (shards, zarr, index.json, empty/); rank 0 returns the manifest."""
    return execute(STAGE, cfg, force)
