"""Each artifact format between stages (shared/formats): a round trip through its writer and reader, and a
reader that meets another format version stops with one line naming that version and the command that
rewrites the artifact."""
import io
import json
from pathlib import Path

import numpy as np
import pytest

from shared.core import artifacts, integrity
from shared.core.errors import InputError
from shared.formats import samples as fmt
from shared.formats import shards
from shared.formats.jsonl import JsonlWriter
from shared.formats.plan import PLAN_VERSION, PlanRow, PlanWriter, read_plan, require
from shared.formats.samples import ENCODE_VERSION, WINDOW_TOKENS, EmptyCaption, Layout, Sample
from shared.formats.shard_index import BucketEntry, Index, ShardEntry, read_index, write_index


def finished(folder: Path, stage: str, version: int) -> artifacts.Manifest:
    """Make `folder` a finished `stage` output of format `version` (its files recorded in the manifest)."""
    files, trees = integrity.record(folder)
    manifest = artifacts.Manifest(stage=stage, version=version, code_version="test", config={}, inputs={},
                                  fingerprint="f", files=files, trees=trees)
    (folder / artifacts.MANIFEST).write_text(manifest.to_json())
    return manifest


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- bucket plan rows

ITEM = {"id": "a5d0cb46c80ea7fd", "path": "img_000.png", "source": "/data/src", "caption_path": "img_000.txt",
        "width": 320, "height": 240, "stored_width": 240, "stored_height": 320, "orientation": 6, "mode": "RGB",
        "format": "PNG", "frames": 1, "bytes": 307964, "caption": "tag0, common", "caption_encoding": "utf-8",
        "tags": ["tag0", "common"], "tag_weight": 0.959014, "sha256": "a5" * 32, "repeats": 2,
        "role": "instance"}  # as ingest writes items (the role since DreamBooth sources)


def test_plan_rows_round_trip_with_the_bytes_bucket_always_wrote(tmp_path):
    row = PlanRow.planned(ITEM, (128, 96), (128, 96), (0, 0), 0.4)
    assert row.bucket == (128, 96) and row.tags == ("tag0", "common") and row.image == "/data/src/img_000.png"
    assert PlanRow.from_json(row.to_json()) == row
    newer = PlanRow.from_json({**row.to_json(), "aesthetic": 6.5})  # a field of a newer ingest travels along
    assert newer.extra == {"aesthetic": 6.5} and newer.to_json()["aesthetic"] == 6.5
    with PlanWriter(tmp_path) as w:
        w.write(row)
    with JsonlWriter(tmp_path / "before.jsonl") as old:  # how bucket wrote a row before the record existed
        old.write({**ITEM, "bucket": [128, 96], "resize": [128, 96], "crop": [0, 0], "scale": 0.4})
    assert (tmp_path / "plan.jsonl").read_bytes() == (tmp_path / "before.jsonl").read_bytes()
    finished(tmp_path, "bucket", PLAN_VERSION)
    assert read_plan(tmp_path) == [row]


def test_plan_of_another_version_or_a_bad_row_is_refused(tmp_path):
    with PlanWriter(tmp_path) as w:
        w.write(PlanRow.planned(ITEM, (128, 96), (128, 96), (0, 0), 0.4))
    finished(tmp_path, "bucket", PLAN_VERSION + 1)
    with pytest.raises(InputError) as e:
        require(tmp_path)
    assert f"format version {PLAN_VERSION + 1}" in one_line(e) and f"sdxl bucket --out {tmp_path}" in str(e.value)
    (tmp_path / "plan.jsonl").write_text(json.dumps(ITEM) + "\n")  # no placement
    finished(tmp_path, "bucket", PLAN_VERSION)
    with pytest.raises(InputError, match=r"plan\.jsonl line 1: not a plan row .*bucket.*; rerun: sdxl bucket"):
        read_plan(tmp_path)


# ---------------------------------------------------------------- encoded samples


def sample(key: str = "k1", variants: int = 2, windows: tuple = (2, 1), clip: bool = True) -> Sample:
    rng = np.random.default_rng(len(key))
    n = max(windows) * WINDOW_TOKENS
    te = np.zeros((variants, n, 8), np.float16)
    for v, w in enumerate(windows):
        te[v, :w * WINDOW_TOKENS] = rng.standard_normal((w * WINDOW_TOKENS, 8))
    extra = {}
    if clip:
        extra = {"clip_image": rng.standard_normal(4).astype(np.float32),
                 "clip_text": rng.standard_normal(4).astype(np.float32), "clip_similarity": 0.25}
    return Sample(key=key, latent=rng.standard_normal((4, 2, 3)).astype(np.float16), te=te, windows=windows,
                  pooled=rng.standard_normal((variants, 6)).astype(np.float16),
                  time_ids=(240.0, 320.0, 0.0, 16.0, 16.0, 24.0), time_ids_flip=(240.0, 320.0, 0.0, 8.0, 16.0, 24.0),
                  tag_weight=0.75, repeats=3, prior=True, latent_flip=rng.standard_normal((4, 2, 3)).astype(np.float16),
                  ids=rng.integers(0, 9, (variants, 2, n)).astype(np.int32), path="a.png", source="/src",
                  bucket=(24, 16), caption="a, b", tags=("a", "b"), variants=("a, b", "b, a"),
                  original_size=(240, 320), crop_top_left=(0, 16), target_size=(16, 24), **extra)


ARRAYS = ("latent", "latent_flip", "te", "pooled", "ids", "clip_image", "clip_text")
SCALARS = ("key", "windows", "time_ids", "time_ids_flip", "tag_weight", "repeats", "prior", "clip_similarity")


def assert_same(a: Sample, b: Sample, fields: tuple = ARRAYS + SCALARS) -> None:
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        else:
            assert x == y, name


def test_a_sample_round_trips_through_a_tar_shard(tmp_path):
    want = [sample("k1"), sample("key2", windows=(1, 1), clip=False)]
    shards.write_tar(tmp_path / "s.tar", [fmt.to_tar(s) for s in want])
    with open(tmp_path / "s.tar", "rb") as fh:
        got = [fmt.from_tar(raw, "s.tar", "fix") for raw in shards.tar_members(fh, "s.tar")]
    for a, b in zip(want, got):
        assert_same(a, b)
        assert (b.path, b.caption, b.tags, b.variants, b.target_size) == (a.path, a.caption, a.tags, a.variants,
                                                                           a.target_size)
    assert got[1].clip_image is None and got[1].clip_similarity is None


def test_a_sample_of_another_version_is_refused():
    raw = {k: v for k, v in shards.sample_members(fmt.to_tar(sample()))}
    meta = json.loads(raw["k1.json"])
    meta["version"] = ENCODE_VERSION - 1
    members = {"__key__": "k1", **{k.split(".", 1)[1]: v for k, v in raw.items()},
               "json": json.dumps(meta).encode()}
    with pytest.raises(InputError) as e:
        fmt.from_tar(members, "enc/shards/16x24/000000.tar", "sdxl encode --out enc")
    assert f"encode format version {ENCODE_VERSION - 1}" in one_line(e) and "sdxl encode --out enc" in str(e.value)


LAYOUT = Layout(storage_dtype="float16", latent_channels=4, scaling_factor=0.13, te_dim=8, pooled_dim=6,
                variants=2, max_windows=3, flip=True, token_ids=True, clip_dim=4)


def test_samples_round_trip_through_zarr_rows(tmp_path):
    want = [sample("k1"), sample("key2", windows=(1, 3))]
    store = shards.open_store(tmp_path / "zarr", mode="a")
    shards.create_arrays(store, "24x16", fmt.zarr_specs(LAYOUT, (24, 16), 3), shards.zarr_codecs("none", 0),
                         fmt.zarr_attrs((24, 16), ["k0", "k1", "key2"]))
    group = store["24x16"]
    fmt.write_rows(group, 1, want)
    fmt.check_group(group, "zarr/24x16", "fix")
    rows, keys = fmt.read_rows(group, 1, 3)
    assert keys == ["k1", "key2"] and rows["te"].shape == (2, 2, 3 * WINDOW_TOKENS, 8)
    for a, b in zip(want, fmt.from_rows(rows, keys)):
        assert_same(a, b, ARRAYS + ("key", "windows", "time_ids", "time_ids_flip", "tag_weight", "repeats", "prior"))
    assert fmt.rows_digest(rows, keys) == fmt.rows_digest(*fmt.read_rows(group, 1, 3))
    group.attrs["version"] = ENCODE_VERSION + 1
    with pytest.raises(InputError) as e:
        fmt.check_group(group, "enc/zarr/24x16", "sdxl encode --out enc")
    assert f"version {ENCODE_VERSION + 1}" in one_line(e) and "sdxl encode --out enc" in str(e.value)


# ---------------------------------------------------------------- the index and the empty caption


def index() -> Index:
    entries = (ShardEntry(name="shards/24x16/000000.tar", shard=0, first=0, samples=2, repeats=(1, 3), bytes=10,
                          sha256="a" * 64, content_sha256="b" * 64, zarr_sha256="c" * 64, keys=("k0", "k1")),
               ShardEntry(name=None, shard=1, first=2, samples=1, repeats=(2,), content_sha256="d" * 64,
                          keys=("k2",)))
    return Index("both", LAYOUT, (BucketEntry((24, 16), entries),), {"b": 1, "a": 3})


def test_the_index_round_trips(tmp_path):
    want = index()
    assert want.samples == 3 and want.layout.latent_channels == 4 and want.buckets[0].bucket == (24, 16)
    assert Index.from_json(json.loads(json.dumps(want.to_json()))) == want
    write_index(tmp_path, want)
    data = json.loads((tmp_path / "index.json").read_text())
    assert data["version"] == ENCODE_VERSION and data["samples"] == 3 and list(data["tag_frequency"]) == ["a", "b"]
    assert read_index(tmp_path, finished(tmp_path, "encode", ENCODE_VERSION)) == want


@pytest.mark.parametrize("edit", ["version", "sums"])
def test_an_index_of_another_version_or_with_wrong_sums_is_refused(tmp_path, edit):
    data = index().to_json()
    if edit == "version":
        data["version"] = ENCODE_VERSION - 1
    else:
        data["buckets"][0]["shards"][0]["repeats"].append(1)
    (tmp_path / "index.json").write_text(json.dumps(data))
    with pytest.raises(InputError) as e:
        read_index(tmp_path, finished(tmp_path, "encode", ENCODE_VERSION))
    if edit == "version":
        assert f"encode format version {ENCODE_VERSION - 1}" in one_line(e)
    else:
        assert "not a valid encode index" in one_line(e) and "3 repeats for 2 samples" in str(e.value)
    assert f"sdxl encode --out {tmp_path}" in str(e.value)


def test_the_empty_caption_round_trips_and_checks_its_version(tmp_path):
    want = EmptyCaption(np.ones((WINDOW_TOKENS, 8), np.float16), np.arange(6, dtype=np.float16),
                        np.arange(2 * WINDOW_TOKENS, dtype=np.int32).reshape(2, WINDOW_TOKENS))
    fmt.write_empty(tmp_path, want)
    got = fmt.read_empty(tmp_path, finished(tmp_path, "encode", ENCODE_VERSION))
    for name in ("te", "pooled", "ids"):
        assert np.array_equal(getattr(got, name), getattr(want, name)) and getattr(got, name).dtype == getattr(want, name).dtype
    with pytest.raises(InputError) as e:
        fmt.read_empty(tmp_path, finished(tmp_path, "encode", ENCODE_VERSION - 1))
    assert f"encode format version {ENCODE_VERSION - 1}" in one_line(e) and "sdxl encode --out" in str(e.value)
    manifest = finished(tmp_path, "encode", ENCODE_VERSION)
    np.save(tmp_path / "empty" / "te.npy", np.zeros((WINDOW_TOKENS, 8), np.float16))
    with pytest.raises(InputError, match="te.npy: changed since it was written"):
        fmt.read_empty(tmp_path, manifest)


def test_encode_output_of_another_version_is_refused(tmp_path):
    finished(tmp_path, "encode", ENCODE_VERSION - 1)
    with pytest.raises(InputError) as e:
        fmt.require_encode(tmp_path)
    assert f"format version {ENCODE_VERSION - 1}" in one_line(e) and f"sdxl encode --out {tmp_path}" in str(e.value)


def test_locations_and_npy_views():
    from shared.formats import location

    assert location.is_url("https://h/enc") and location.is_url("s3://b/enc") and location.is_url("pipe:cat x")
    assert not location.is_url("/data/enc") and not location.is_url("enc") and not location.is_url(Path("s3:/x"))
    assert location.join("https://h/enc/", "shards", "64x64/000001.tar") == "https://h/enc/shards/64x64/000001.tar"
    assert location.join(Path("/d/enc"), "index.json") == Path("/d/enc/index.json")
    good = bytearray(shards.npy_bytes(np.arange(6, dtype=np.int16).reshape(2, 3)))
    view = shards.npy_view(memoryview(good), 0, len(good))
    assert view.tolist() == [[0, 1, 2], [3, 4, 5]] and np.shares_memory(view, np.frombuffer(good, np.uint8))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object"):
        shards.npy_view(memoryview(buf.getvalue()), 0, len(buf.getvalue()))
    with pytest.raises(ValueError, match="does not hold"):
        shards.npy_view(memoryview(good + b"xx"), 0, len(good) + 2)
