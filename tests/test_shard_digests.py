"""Shard digests (issue 24): encode records each shard's BLAKE3 beside its sha256 (tar bytes and zarr rows), train
checks the BLAKE3 where recorded and sha256 where not (an older sdxl's index), and a damaged or replaced shard is
refused under either; the index record only gains keys, so an old index reads as before."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.core import integrity
from shared.core.errors import DataError
from shared.formats import shard_index, shards
from shared.formats import samples as fmt
from shared.formats.shard_index import ShardEntry
from stages.bench import loader_data
from stages.encode import writer
from stages.train import feed
from stages.train import reader as R

SHAPES = loader_data.Shapes(side=32, te_dims=(8, 24), pooled=24)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """The same 14 samples in shards of 6 (the last short), tar + zarr, with index.json as encode writes it now
    (sha256 and blake3) and as an sdxl before 2026-12 wrote it (sha256 only)."""
    root = tmp_path_factory.mktemp("digests")
    loader_data.write_encode_output(root / "new", 14, SHAPES, shard_samples=6, digests=shards.DIGESTS)
    loader_data.write_encode_output(root / "old", 14, SHAPES, shard_samples=6)
    return {"new": root / "new", "old": root / "old"}


def config(where: Path, source: str) -> feed.DataConfig:
    return feed.DataConfig(input=where, shards=(), source=source, batch_size=2, accumulate=1, shuffle_buffer=4,
                           epochs=1, max_steps=0, seed=0, prefetch=2)


def shard_records(folder: Path) -> list[dict]:
    index = json.loads((folder / "index.json").read_text())
    return [s for b in index["buckets"] for s in b["shards"]]


def counting(monkeypatch) -> list[str]:
    """The digests train's reader computes, by algorithm (tar: sha256 | blake3; zarr rows: rows-<algorithm>)."""
    calls: list[str] = []
    real_digest, real_rows = shards.digest, shards.zarr_digest
    real_sha = R.hashlib.sha256
    monkeypatch.setattr(R.shards, "digest", lambda data, a: calls.append(a) or real_digest(data, a))
    monkeypatch.setattr(R.shards, "zarr_digest", lambda rows, keys, a="sha256": calls.append(f"rows-{a}")
                        or real_rows(rows, keys, a))
    monkeypatch.setattr(R, "hashlib", type("H", (), {"sha256": staticmethod(
        lambda data=b"": calls.append("sha256") or real_sha(data))}))
    monkeypatch.setattr(R.fmt, "rows_digest", lambda rows, keys: calls.append("rows-sha256") or real_rows(rows, keys))
    return calls


def test_a_new_index_records_blake3_beside_sha256_and_an_old_one_reads_as_written(outputs):
    new, old = shard_records(outputs["new"]), shard_records(outputs["old"])
    assert len(new) == len(old) == 3
    for s, o in zip(new, old):
        tar = outputs["new"] / s["name"]
        assert shards.file_digests(tar) == {"sha256": s["sha256"], "blake3": s["blake3"]}
        assert s["zarr_blake3"] and s["zarr_blake3"] != s["zarr_sha256"]
        assert "blake3" not in o and "zarr_blake3" not in o  # the record an older sdxl wrote, key for key
        assert {k: v for k, v in s.items() if k not in shard_index.OPTIONAL} == o  # the same shards otherwise
    index = json.loads((outputs["new"] / "index.json").read_text())
    assert index["version"] == fmt.ENCODE_VERSION  # only keys were added: an older sdxl reads it (and checks sha256)


def test_the_entry_round_trips_with_and_without_blake3():
    base = dict(name="shards/8x8/000000.tar", shard=0, first=0, samples=1, repeats=(1,), bytes=10, sha256="a" * 64,
                content_sha256="b" * 64, zarr_sha256="c" * 64, keys=("k",))
    old = ShardEntry(**base)
    assert set(old.to_json()) == set(base) and ShardEntry.from_json(old.to_json()) == old
    new = ShardEntry(**base, blake3="d" * 64, zarr_blake3="e" * 64)
    assert new.to_json()["blake3"] == "d" * 64 and ShardEntry.from_json(new.to_json()) == new
    assert new.tar_digests == {"sha256": "a" * 64, "blake3": "d" * 64}
    assert new.rows_digests == {"sha256": "c" * 64, "blake3": "e" * 64}
    assert ShardEntry.from_json({**old.to_json(), "some_later_key": 1}) == old  # unknown keys are ignored


def test_matches_checks_blake3_first_and_sha256_decides():
    data = b"shard bytes"
    good = {a: shards.digest(data, a) for a in shards.DIGESTS}
    computed: list[str] = []

    def compute(a: str) -> str:
        computed.append(a)
        return shards.digest(data, a)

    assert shard_index.matches(good, compute) and computed == ["blake3"]  # sha256 not computed at all
    computed.clear()
    assert shard_index.matches({"sha256": good["sha256"], "blake3": None}, compute) and computed == ["sha256"]
    computed.clear()
    assert shard_index.matches({**good, "blake3": "0" * 64}, compute) and computed == ["blake3", "sha256"]
    assert not shard_index.matches({"sha256": "0" * 64, "blake3": "0" * 64}, compute)
    assert not shard_index.matches({"sha256": "0" * 64, "blake3": None}, compute)
    assert not shard_index.matches({"sha256": None, "blake3": None}, compute)
    with pytest.raises(ValueError, match="digest 'md5'"):
        shards.hasher("md5")


@pytest.mark.parametrize("source", ["wds", "zarr"])
def test_train_checks_blake3_where_recorded_and_sha256_in_an_old_index(outputs, monkeypatch, source):
    calls = counting(monkeypatch)
    streams = {}
    for kind in ("new", "old"):
        calls.clear()
        data = feed.open_data(config(outputs[kind], source))
        assert (len(data.read.entries) == 3) == (kind == "new")
        streams[kind] = [(s.key, float(np.asarray(s.latent, np.float64).sum()))
                         for n in range(3) for s in data.read.load(n)]
        prefix = "" if source == "wds" else "rows-"
        assert calls == [f"{prefix}{'blake3' if kind == 'new' else 'sha256'}"] * 3
    assert streams["new"] == streams["old"] and len(streams["new"]) == 14


@pytest.mark.parametrize("kind", ["new", "old"])
def test_a_flipped_byte_or_a_replaced_tar_is_refused_under_either(outputs, tmp_path, kind):
    copy = tmp_path / kind
    shutil.copytree(outputs[kind], copy)
    names = [s["name"] for s in shard_records(copy)]
    raw = bytearray((copy / names[1]).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (copy / names[1]).write_bytes(bytes(raw))
    reader = feed.open_data(config(copy, "wds")).read
    reader.load(0)
    with pytest.raises(DataError, match=rf"{names[1]}: not the shard encode wrote"):
        reader.load(1)
    shutil.copy(copy / names[0], copy / names[1])  # a whole valid shard, but not this one (a different size)
    with pytest.raises(DataError, match=rf"{names[1]}: not the shard encode wrote"):
        feed.open_data(config(copy, "wds")).read.load(1)


@pytest.mark.parametrize("kind", ["new", "old"])
def test_tampered_zarr_rows_are_refused_under_either(outputs, tmp_path, kind):
    copy = tmp_path / kind
    shutil.copytree(outputs[kind], copy)
    chunks = copy / "zarr" / "32x32" / "latent" / "c"
    shutil.copy(chunks / "0" / "0" / "0" / "0", chunks / "1" / "0" / "0" / "0")  # shard 1's latents: shard 0's
    reader = feed.open_data(config(copy, "zarr")).read
    reader.load(0)
    with pytest.raises(DataError, match=r"rows 6\.\.11 .* differ from what encode recorded"):
        reader.load(1)


def test_by_url_blake3_is_checked_and_damage_named(outputs, tmp_path, monkeypatch):
    from stages.bench.server import LatencyServer

    copy = tmp_path / "served"
    shutil.copytree(outputs["new"], copy / "new")
    local = {s: [x.key for n in range(3) for x in feed.open_data(config(outputs["new"], s)).read.load(n)]
             for s in ("wds", "zarr")}
    calls = counting(monkeypatch)
    with LatencyServer(copy, latency_ms=1, max_requests=2000, max_seconds=120) as url:
        for source in ("wds", "zarr"):
            calls.clear()
            reader = feed.open_data(config(f"{url}/new", source)).read
            assert len(reader.entries) == 3
            assert [x.key for n in range(3) for x in reader.load(n)] == local[source]
            assert calls == [("" if source == "wds" else "rows-") + "blake3"] * 3
        name = shard_records(copy / "new")[2]["name"]
        tar = copy / "new" / name
        tar.write_bytes(tar.read_bytes()[:-1024] + b"\x01" * 1024)
        with pytest.raises(DataError, match=rf"{name}: not the shard encode wrote"):
            feed.open_data(config(f"{url}/new", "wds")).read.load(2)


def test_a_blake3_record_that_disagrees_with_sha256_is_decided_by_sha256(outputs, tmp_path):
    """An index edited by a tool that knows only the sha256 records (and re-recorded in the manifest)."""
    copy = tmp_path / "new"
    shutil.copytree(outputs["new"], copy)
    index = json.loads((copy / "index.json").read_text())
    for s in (s for b in index["buckets"] for s in b["shards"]):
        s["blake3"] = s["zarr_blake3"] = "0" * 64
    (copy / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["index.json"] = integrity.file_record(copy / "index.json")
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for source in ("wds", "zarr"):
        reader = feed.open_data(config(copy, source)).read
        assert len(reader.entries) == 3
        assert [s.key for s in reader.load(2)] == [f"{i:08d}" for i in range(12, 14)]


def test_a_blake3_record_of_another_shard_is_not_used(outputs):
    """The reader binds each index entry to its ShardInfo by their sha256 records; one that differs (another
    index than the one the infos came from) lends no blake3 digest: the info's sha256 is checked."""
    data = feed.open_data(config(outputs["new"], "wds"))
    other = shard_index.read_index(outputs["old"], fmt.require_encode(outputs["old"]))
    assert R.recorded_entries(outputs["new"], data.infos, other) == {}
    again = R.recorded_entries(outputs["new"], data.infos)
    assert sorted(again) == [0, 1, 2] and all(again[n].blake3 for n in again)
    moved = [dataclasses.replace(i, sha256="0" * 64) if i.number == 1 else i for i in data.infos]
    assert sorted(R.recorded_entries(outputs["new"], moved)) == [0, 2]


def test_a_local_shard_checked_by_blake3_is_hashed_once(outputs, tmp_path, monkeypatch):
    import time

    copy = tmp_path / "new"
    shutil.copytree(outputs["new"], copy)
    calls = counting(monkeypatch)
    monkeypatch.setattr(R, "RACY_SECONDS", 0.0)
    time.sleep(0.01)
    for source in ("wds", "zarr"):
        calls.clear()
        reader = feed.open_data(config(copy, source)).read
        for _ in range(3):
            reader.load(0)
        assert len(calls) == 1 and "blake3" in calls[0]


def test_encodes_repair_check_reads_either_record(outputs, tmp_path):
    """writer.shard_intact (what a rerun of encode checks finished shards by): blake3 where recorded, sha256 in an
    old record; a flipped byte in the tar or swapped zarr rows is damage under either."""
    for kind in ("new", "old"):
        copy = tmp_path / kind
        shutil.copytree(outputs[kind], copy)
        index = shard_index.read_index(copy, fmt.require_encode(copy))
        store = shards.open_store(copy / "zarr", mode="r")
        records = [writer.ShardRecord(s, b.bucket, {}, 0) for b, s in index.shards()]
        assert all(writer.shard_intact(copy, r, store) for r in records)
        raw = bytearray((copy / records[0].entry.name).read_bytes())
        raw[-2000] ^= 0x01
        (copy / records[0].entry.name).write_bytes(bytes(raw))
        assert not writer.shard_intact(copy, records[0], None)
        assert writer.shard_intact(copy, records[1], store)
        chunks = copy / "zarr" / "32x32" / "te" / "c"
        shutil.copy(chunks / "0" / "0" / "0" / "0", chunks / "1" / "0" / "0" / "0")
        assert not writer.shard_intact(copy, records[1], store)


def test_encode_records_both_digests_and_train_reads_its_output(tmp_path):
    from tests.conftest import caption, noise_image, save
    from tests.test_integrity import run_bucket, run_encode, run_ingest

    for i in range(6):
        p = save(noise_image(256, 256, seed=700 + i), tmp_path / "src" / f"img_{i:02d}.png")
        caption(p, f"colour {i % 3}")
    work = tmp_path / "w"
    run_ingest(tmp_path / "src", work)
    run_bucket(work)
    run_encode(work)
    out = work / "encode"
    records = shard_records(out)
    assert len(records) == 2
    index = shard_index.read_index(out, fmt.require_encode(out))
    store = shards.open_store(out / "zarr", mode="r")
    for s, (b, entry) in zip(records, index.shards()):
        assert shards.file_digests(out / s["name"]) == {"sha256": s["sha256"], "blake3": s["blake3"]}
        rows, keys = fmt.read_rows(store[b.group], entry.first, entry.first + entry.samples)
        assert s["zarr_sha256"] == fmt.rows_digest(rows, keys)
        assert s["zarr_blake3"] == shards.zarr_digest(rows, keys, "blake3")
        done = json.loads((out / "done" / f"{b.group}" / f"{entry.shard:06d}.json").read_text())
        assert done["blake3"] == s["blake3"]  # the completion record (what a rerun's repair check reads)
    for source in ("wds", "zarr"):
        reader = feed.open_data(config(out, source)).read
        assert len(reader.entries) == 2 and len(reader.load(0) + reader.load(1)) == 6
