"""Encoded samples (encode → train): the per-sample record, its tar members and zarr rows, and the empty
caption's record; with the constants both stages share (text window, encoder parts, format version).

A `Sample` is one planned item after encoding. In a tar shard it is a run of members `<key>.latent.npy`,
`.latent_flip.npy`, `.te.npy`, `.pooled.npy`, `.ids.npy`, `.clip_image.npy`, `.clip_text.npy`,
`.latent_crops.npy`, `.latent_flip_crops.npy` (encode's crops_per_item > 1), `.pixels.png` / `.pixels.webp`
(the planned crop itself, lossless, for the VAE target) and `.json` (the scalars and what the item was:
path, captions, sizes, the extra crops' time ids; with the format `version`); in the zarr store it is
row k of each array of its bucket's group (`zarr_specs`; a shard's rows are one chunk), `te` padded to
`max_windows` windows with the valid count in `te_windows`, the keys and the `version` in the group's
attributes. `Layout` says what every sample of one encode output holds. The empty caption's states sit in `empty/` (`EmptyCaption`).
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from shared.core import artifacts, graph
from shared.core.errors import InputError
from shared.formats import location, shards

WINDOW_TOKENS = 77  # one text window: BOS + 75 caption tokens + EOS (CLIP's context length)
#: the model parts encode uses; train refuses shards whose parts differ from its model's
ENCODER_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
#: the encode output's format (2: per-shard repeats, tag frequency; 3: file hashes, zarr digests; 4: typed
#: records: the version in index.json, in each sample's json and in each zarr group, `clip_dim`; 5: the zarr
#: store chunked by shard, one chunk per shard and array, instead of one per sample; 6: optional `pixels`, the
#: planned crop as a lossless PNG / WebP member or a uint8 zarr array (`Layout.pixels`); with crops_per_item
#: > 1 the extra crops' latents and time ids (`latent_crops` …, `Layout.crops`); each shard's sample keys in
#: index.json)
ENCODE_VERSION = 6
SAMPLES = graph.declare(graph.Format(
    "samples", ENCODE_VERSION, "encoded samples: tar shards and/or a zarr store, index.json and empty/",
    made_by="encode"))
#: how the planned crop's pixels are stored besides the latents (none: not stored)
PIXEL_FORMATS = ("none", "png", "webp")
EMPTY = "empty"


def fix_for(folder: Path | str) -> str:
    """The command that rewrites the encoded samples at `folder` (from the stage graph)."""
    return graph.fix(SAMPLES, folder)


def check_version(found: Any, where: str, fix: str) -> None:
    """One line naming the version found and the command that rewrites it, unless it is ENCODE_VERSION."""
    if found != ENCODE_VERSION:
        shown = found if found is not None else "unrecorded (3 or older)"
        raise InputError(f"{where}: encode format version {shown}, but this sdxl reads version {ENCODE_VERSION}; "
                         f"rewrite it: {fix}")


def require_encode(folder: Path | str) -> artifacts.Manifest:
    """The finished encode output at `folder` (a local folder or an fsspec URL), of this format version (else one
    line naming the fix)."""
    if location.is_url(folder):
        return location.require_remote(str(folder), SAMPLES)
    return artifacts.require_input(Path(folder), SAMPLES)


@dataclass(frozen=True)
class Layout:
    """What every sample of one encode output holds, and in which shapes."""
    storage_dtype: str      # float16 | float32: latents, text states, pooled
    latent_channels: int
    scaling_factor: float   # the VAE's; latents are stored scaled (minus its shift factor)
    te_dim: int             # both encoders' penultimate states, concatenated (2048 on SDXL)
    pooled_dim: int
    variants: int           # captions per sample: as written, then tag shuffles
    max_windows: int        # longest caption, in WINDOW_TOKENS windows
    flip: bool              # latent_flip present
    token_ids: bool         # ids present
    clip_dim: int = 0       # width of clip_image / clip_text; 0: none stored
    pixels: str = "none"    # the planned crop stored too (uint8 RGB): png | webp members, a zarr array; or none
    crops: int = 1          # crops per sample: `latent` (the planned one), then `latent_crops` (crops - 1)

    @property
    def te_length(self) -> int:
        return self.max_windows * WINDOW_TOKENS

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Layout":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True, kw_only=True, eq=False)
class Sample:
    """One encoded item. Arrays are numpy in the stored dtype; `te[v]` holds variant v's states in its first
    `windows[v] * WINDOW_TOKENS` rows (zeros after). The fields from `path` on are descriptive and kept in tar
    shards only (a zarr row holds the arrays, the scalars and the key)."""
    key: str                         # the item id
    latent: np.ndarray               # [C, H/8, W/8]
    te: np.ndarray                   # [variants, max(windows) * 77, te_dim]
    windows: tuple[int, ...]         # per variant
    pooled: np.ndarray               # [variants, pooled_dim]
    time_ids: tuple[float, ...]      # SDXL micro-conditioning (heights first), 6 numbers
    time_ids_flip: tuple[float, ...]  # the same for the mirrored crop
    tag_weight: float = 1.0
    repeats: int = 1
    prior: bool = False                     # a DreamBooth class image (its loss weighs prior_loss_weight)
    latent_flip: np.ndarray | None = None   # the mirrored crop's latent
    ids: np.ndarray | None = None           # [variants, 2, max(windows) * 77] int32, both tokenizers
    clip_image: np.ndarray | None = None    # [clip_dim] float32, L2-normalised
    clip_text: np.ndarray | None = None
    clip_similarity: float | None = None
    pixels: np.ndarray | None = None        # [H, W, 3] uint8: the planned crop the latent was encoded from
    path: str = ""
    source: str = ""
    bucket: tuple[int, int] = (0, 0)
    caption: str = ""
    tags: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()           # the captions encoded, variant 0 as written
    original_size: tuple[int, int] = (0, 0)  # [h, w], as in time_ids
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] = (0, 0)
    # encode's crops_per_item > 1: the extra random crops (crop k + 1 at index k; crop 0 is `latent`)
    latent_crops: np.ndarray | None = None        # [crops - 1, C, H/8, W/8]
    latent_flip_crops: np.ndarray | None = None   # their mirror images' latents (with latent_flip)
    time_ids_crops: tuple[tuple[float, ...], ...] = ()       # per extra crop, 6 numbers
    time_ids_flip_crops: tuple[tuple[float, ...], ...] = ()

    @property
    def crops(self) -> int:
        """How many crops the sample holds (1: the planned crop only)."""
        return 1 + (0 if self.latent_crops is None else len(self.latent_crops))

    def crop(self, k: int, flip: bool) -> tuple[np.ndarray, tuple[float, ...]]:
        """(latent, time ids) of crop `k` (0: the planned crop), mirrored with `flip`."""
        if k == 0:
            return (self.latent_flip, self.time_ids_flip) if flip else (self.latent, self.time_ids)
        if flip:
            return self.latent_flip_crops[k - 1], self.time_ids_flip_crops[k - 1]
        return self.latent_crops[k - 1], self.time_ids_crops[k - 1]

    def detached(self) -> "Sample":
        """The same sample with arrays of its own: a sample read from a shard views the shard's buffer, which
        stays in memory while any of its samples does."""
        return replace(self, **{f.name: np.array(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), np.ndarray)})


CROP_ARRAYS = ("latent_crops", "latent_flip_crops")  # .npy members when the sample has extra crops
ARRAYS = ("latent", "latent_flip", "te", "pooled", "ids", "clip_image", "clip_text") + CROP_ARRAYS  # .npy members
CROP_META = ("time_ids_crops", "time_ids_flip_crops")  # in the json when the sample has extra crops
META = ("path", "source", "bucket", "caption", "tags", "variants", "windows", "tag_weight", "repeats", "prior",
        "original_size", "crop_top_left", "target_size", "time_ids", "time_ids_flip")


def to_tar(sample: Sample, pixels: str = "png") -> dict[str, Any]:
    """The sample as webdataset members: {"__key__": key, "latent.npy": array, ..., "json": metadata}; its
    pixels (when it has them) as a lossless `pixels.<png|webp>` image."""
    out: dict[str, Any] = {"__key__": sample.key}
    for name in ARRAYS:
        value = getattr(sample, name)
        if value is not None:
            out[f"{name}.npy"] = value
    if sample.pixels is not None:
        out[f"pixels.{pixels}"] = image_bytes(sample.pixels, pixels)
    meta = {"version": ENCODE_VERSION, "id": sample.key}
    meta.update({k: _plain(getattr(sample, k)) for k in META})
    if sample.clip_similarity is not None:
        meta["clip_similarity"] = sample.clip_similarity
    if sample.latent_crops is not None:
        meta.update({k: [list(t) for t in getattr(sample, k)] for k in CROP_META})
    out["json"] = meta
    return out


def from_tar(raw: dict[str, Any], where: str, fix: str, pixels: bool = True) -> Sample:
    """A sample from its tar members: raw bytes (as `shards.tar_members` yields them) or, for the arrays,
    arrays already (as `shards.tar_samples` yields them). `pixels` False leaves a pixel image undecoded (its
    `pixels` None: a reader that has no use for them)."""
    meta = shards.decode_member("json", raw["json"])
    check_version(meta.get("version"), f"{where}: sample {raw['__key__']}", fix)
    arrays = {name: _array(raw[f"{name}.npy"]) for name in ARRAYS if f"{name}.npy" in raw}
    for kind in PIXEL_FORMATS[1:] if pixels else ():
        if f"pixels.{kind}" in raw:
            arrays["pixels"] = image_array(raw[f"pixels.{kind}"], f"{where}: sample {raw['__key__']}", fix)
    tuples = {k: tuple(meta[k]) for k in ("bucket", "tags", "variants", "windows", "original_size",
                                          "crop_top_left", "target_size", "time_ids", "time_ids_flip")}
    tuples.update({k: tuple(tuple(t) for t in meta[k]) for k in CROP_META if k in meta})
    return Sample(key=raw["__key__"], **arrays, **tuples, tag_weight=meta["tag_weight"], repeats=meta["repeats"],
                  prior=bool(meta["prior"]), clip_similarity=meta.get("clip_similarity"), path=meta["path"], source=meta["source"],
                  caption=meta["caption"])


def image_bytes(pixels: np.ndarray, kind: str) -> bytes:
    """uint8 [H, W, 3] as a lossless PNG or WebP file's bytes (the same bytes for the same pixels: reused samples
    equal fresh ones)."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels, np.uint8), "RGB")
    if kind == "png":
        image.save(buf, "PNG", compress_level=6)
    elif kind == "webp":
        image.save(buf, "WEBP", lossless=True, quality=80, method=4, exact=True)
    else:
        raise ValueError(f"pixels {kind!r}: expected one of {', '.join(PIXEL_FORMATS[1:])}")
    return buf.getvalue()


def image_array(data: bytes, where: str, fix: str) -> np.ndarray:
    """A pixels member's image as uint8 [H, W, 3] (one line naming the sample if it cannot be decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: unreadable pixels member ({e}); rewrite it: {fix}") from None


def _array(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else shards.decode_member(".npy", value)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- zarr rows


def zarr_specs(layout: Layout, bucket: tuple[int, int], count: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The arrays of one bucket's group of `count` samples: {name: (shape, dtype)}."""
    store, v, length = layout.storage_dtype, layout.variants, layout.te_length
    lat = (layout.latent_channels, bucket[1] // 8, bucket[0] // 8)
    specs = {"latent": ((count,) + lat, store), "te": ((count, v, length, layout.te_dim), store),
             "te_windows": ((count, v), "int16"), "pooled": ((count, v, layout.pooled_dim), store),
             "time_ids": ((count, 6), "float32"), "time_ids_flip": ((count, 6), "float32"),
             "tag_weight": ((count,), "float32"), "repeats": ((count,), "int32"), "prior": ((count,), "bool")}
    if layout.flip:
        specs["latent_flip"] = ((count,) + lat, store)
    if layout.token_ids:
        specs["ids"] = ((count, v, 2, length), "int32")
    if layout.pixels != "none":
        specs["pixels"] = ((count, bucket[1], bucket[0], 3), "uint8")
    if layout.clip_dim:
        specs.update(clip_image=((count, layout.clip_dim), "float32"),
                     clip_text=((count, layout.clip_dim), "float32"), clip_similarity=((count,), "float32"))
    if layout.crops > 1:
        extra = (count, layout.crops - 1)
        specs.update(latent_crops=(extra + lat, store), time_ids_crops=(extra + (6,), "float32"),
                     time_ids_flip_crops=(extra + (6,), "float32"))
        if layout.flip:
            specs["latent_flip_crops"] = (extra + lat, store)
    return specs


def zarr_names(layout: Layout) -> tuple[str, ...]:
    """The arrays every bucket group of an output of `layout` holds (so a reader need not list the store)."""
    return tuple(sorted(zarr_specs(layout, (8, 8), 0)))


def zarr_attrs(bucket: tuple[int, int], keys: list[str]) -> dict:
    """A bucket group's attributes: its sample keys in row order, the bucket, the format version."""
    return {"keys": list(keys), "bucket": list(bucket), "version": ENCODE_VERSION}


def write_rows(group: Any, first: int, samples: list[Sample]) -> None:
    """Store `samples` as rows first.. of a bucket group made from `zarr_specs`."""
    lo, hi = first, first + len(samples)
    te = np.zeros((len(samples),) + group["te"].shape[1:], group["te"].dtype)
    ids = np.zeros((len(samples),) + group["ids"].shape[1:], np.int32) if "ids" in group.array_keys() else None
    for k, s in enumerate(samples):
        te[k, :, :s.te.shape[1]] = s.te
        if ids is not None:
            ids[k, :, :, :s.ids.shape[2]] = s.ids
    group["te"][lo:hi] = te
    if ids is not None:
        group["ids"][lo:hi] = ids
    columns = {"latent": [s.latent for s in samples], "latent_flip": [s.latent_flip for s in samples],
               "pooled": [s.pooled for s in samples], "te_windows": [s.windows for s in samples],
               "time_ids": [s.time_ids for s in samples], "time_ids_flip": [s.time_ids_flip for s in samples],
               "tag_weight": [s.tag_weight for s in samples], "repeats": [s.repeats for s in samples],
               "prior": [s.prior for s in samples], "clip_image": [s.clip_image for s in samples], "clip_text": [s.clip_text for s in samples],
               "clip_similarity": [s.clip_similarity for s in samples], "pixels": [s.pixels for s in samples]}
    columns.update({name: [getattr(s, name) for s in samples] for name in CROP_ARRAYS + CROP_META})
    present = set(group.array_keys())
    for name, values in columns.items():
        if name in present:
            group[name][lo:hi] = np.asarray(np.stack([np.asarray(x) for x in values]), group[name].dtype)


def check_group(group: Any, where: str, fix: str) -> None:
    """A bucket group written by this format version (else one line naming the version and the fix)."""
    check_version(group.attrs.get("version"), where, fix)


def read_rows(group: Any, lo: int, hi: int, names: Iterable[str] | None = None,
              where: Path | str | None = None, arrays: dict[str, Any] | None = None,
              alloc: Callable[[int], np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Rows lo..hi-1 of the arrays `names` (default: every array) of a bucket group, and their keys; the arrays
    are read concurrently. Given the group's folder or URL (`where`), each array's chunks are fetched whole
    straight from there and decoded in one call (shards.ChunkReader; a shard is one chunk per array). `arrays`:
    the group's arrays already opened (a remote store's metadata read once); `alloc`: where the buffers of
    objects read and rows decoded come from (location.read_bytes). Unreadable rows raise KeyError,
    ValueError or OSError, which the caller turns into an error naming the shard."""
    names = sorted(names if names is not None else group.array_keys())
    arrays = arrays if arrays is not None else {}
    with ThreadPoolExecutor(max(1, min(len(names), 8))) as pool:
        got = list(pool.map(lambda name: _rows(arrays[name] if name in arrays else group[name], lo, hi, where,
                                               name, alloc), names))
    return dict(zip(names, got)), list(group.attrs["keys"][lo:hi])


def open_arrays(group: Any, names: Iterable[str]) -> dict[str, Any]:
    """The group's arrays `names`, opened once (each is a metadata read; on a remote store, a request)."""
    names = list(names)
    with ThreadPoolExecutor(max(1, min(len(names), 8))) as pool:
        return dict(zip(names, pool.map(lambda name: group[name], names)))


def _rows(array: Any, lo: int, hi: int, where: Path | str | None, name: str,
          alloc: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    reader = shards.ChunkReader.of(array) if where is not None and hi > lo else None
    if reader is None:
        return np.asarray(array[lo:hi])
    raws = shards.read_objects([location.join(where, name, reader.keys(c)) for c in reader.chunks(lo, hi)], alloc)
    return reader.assemble(lo, hi, raws, alloc)


def rows_digest(rows: dict[str, np.ndarray], keys: list[str]) -> str:
    """What encode records per shard and train recomputes (see shards.zarr_digest)."""
    return shards.zarr_digest(rows, keys)


def from_rows(rows: dict[str, np.ndarray], keys: list[str]) -> Iterator[Sample]:
    """The samples of rows read by `read_rows`, each `te` cut to its longest variant (as in a tar)."""
    for j, key in enumerate(keys):
        windows = tuple(int(w) for w in rows["te_windows"][j])
        n = max(windows) * WINDOW_TOKENS
        optional = {name: rows[name][j] for name in ("latent_flip", "clip_image", "clip_text", "pixels") + CROP_ARRAYS
                    if name in rows}
        optional.update({k: tuple(tuple(float(x) for x in t) for t in rows[k][j]) for k in CROP_META if k in rows})
        if "ids" in rows:
            optional["ids"] = rows["ids"][j][:, :, :n]
        if "clip_similarity" in rows:
            optional["clip_similarity"] = float(rows["clip_similarity"][j])
        yield Sample(key=key, latent=rows["latent"][j], te=rows["te"][j][:, :n], windows=windows,
                     pooled=rows["pooled"][j], time_ids=tuple(float(x) for x in rows["time_ids"][j]),
                     time_ids_flip=tuple(float(x) for x in rows["time_ids_flip"][j]),
                     tag_weight=float(rows["tag_weight"][j]), repeats=int(rows["repeats"][j]),
                     prior=bool(rows["prior"][j]), **optional)


# ---------------------------------------------------------------- the empty caption


@dataclass(frozen=True, eq=False)
class EmptyCaption:
    """The empty caption's encoding: what caption dropout trains on and what pads shorter captions."""
    te: np.ndarray       # [WINDOW_TOKENS, te_dim], stored dtype
    pooled: np.ndarray   # [pooled_dim]
    ids: np.ndarray      # [2, WINDOW_TOKENS] int32, both tokenizers


def write_empty(folder: Path, empty: EmptyCaption) -> None:
    """`folder/empty/{te,pooled,ids}.npy` (no pickle)."""
    out = Path(folder) / EMPTY
    out.mkdir(parents=True, exist_ok=True)
    for f in fields(EmptyCaption):
        np.save(out / f"{f.name}.npy", getattr(empty, f.name), allow_pickle=False)


def read_empty(folder: Path | str, manifest: artifacts.Manifest) -> EmptyCaption:
    """The empty caption of the encode output at `folder` (a folder or URL), each file checked against its
    manifest."""
    fix = fix_for(folder)
    check_version(manifest.version, f"{location.join(folder, EMPTY)}", fix)
    arrays = {}
    for f in fields(EmptyCaption):
        rel = f"{EMPTY}/{f.name}.npy"
        data = location.verified_bytes(folder, rel, manifest.files, fix)
        try:
            arrays[f.name] = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{location.join(folder, rel)}: unreadable ({e}); rerun: {fix}") from None
    return EmptyCaption(**arrays)
