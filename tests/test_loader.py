"""train's shard reader: tar shards listed in memory (arrays viewing the verified bytes), zarr rows read chunk by
chunk, shards loaded ahead in threads with each failure raised at its shard's turn, shards let go after their
last needed sample; and encode's output read from a URL (a localhost HTTP server adding latency): index,
manifest and empty/ checked, tar and zarr streaming the same samples as from the folder, damage named."""
import gc
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shared.core.errors import DataError, InputError
from shared.formats import samples as fmt
from shared.formats import shards
from stages.bench import loader_data
from stages.bench.server import LatencyServer
from stages.train import data as D
from stages.train import feed
from stages.train.reader import ReadAhead

SHAPES = loader_data.Shapes(side=32, te_dims=(8, 24), pooled=24)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    """20 samples in shards of 6 (the last short), tar + blosc zarr, committed with a manifest."""
    root = tmp_path_factory.mktemp("loader")
    loader_data.write_encode_output(root / "encode", 20, SHAPES, shard_samples=6)
    return root


def data_config(where, source: str, **kw) -> feed.DataConfig:
    base = dict(input=where, shards=(), source=source, batch_size=2, accumulate=1, shuffle_buffer=4, epochs=1,
                max_steps=0, seed=0, prefetch=2)
    return feed.DataConfig(**{**base, **kw})


def stream(cfg: feed.DataConfig) -> list[list[tuple[str, float]]]:
    data = feed.open_data(cfg)
    schedule = feed.plan(data, cfg, 1)
    return [[(s.key, float(np.asarray(s.latent, np.float64).sum())) for s in samples]
            for samples, _, _ in feed.micro_batches(data, schedule, cfg, 0, 1, 0)]


def test_tar_in_memory_equals_the_streaming_reader(encoded):
    tar = encoded / "encode" / "shards" / "32x32" / "000001.tar"
    data = np.frombuffer(tar.read_bytes(), np.uint8).copy()
    fast = [fmt.from_tar(raw, str(tar), "fix") for raw in shards.tar_samples(data, str(tar))]
    with open(tar, "rb") as fh:
        slow = [fmt.from_tar(raw, str(tar), "fix") for raw in shards.tar_members(fh, str(tar))]
    assert [s.key for s in fast] == [s.key for s in slow] and len(fast) == 6
    for a, b in zip(fast, slow):
        assert np.array_equal(a.latent, b.latent) and np.array_equal(a.te, b.te) and a.time_ids == b.time_ids
    assert np.shares_memory(fast[0].latent, data) and fast[0].latent.flags.writeable  # a view, not a copy


def test_in_memory_listing_refuses_what_write_tar_never_writes(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k." + "x" * 120 + ".npy")  # a long name: a pax header
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="not a plain USTAR"):
        list(shards.tar_samples(buf.getvalue(), "t.tar"))
    with pytest.raises(DataError, match="unreadable shard"):
        list(shards.tar_samples(b"\x00" * 100 + b"x" * 900, "t.tar"))


@pytest.mark.parametrize("compression,chunk_rows", [("lz4", 3), ("blosc", 3), ("zstd", 1), ("none", 3)])
def test_zarr_rows_read_by_chunk_equal_zarrs_own_read(tmp_path, compression, chunk_rows):
    """8 rows in chunks of 3 (the last chunk an edge chunk, its last row never written): every range, within a
    chunk, across chunks, into the edge, read from the chunk objects equals zarr's own read."""
    layout = SHAPES.layout
    store = shards.open_store(tmp_path / "z", mode="a")
    shards.create_arrays(store, "32x32", fmt.zarr_specs(layout, (32, 32), 8), shards.zarr_codecs(compression, 3),
                         fmt.zarr_attrs((32, 32), [f"k{i}" for i in range(8)]), chunk_rows)
    pool = loader_data.random_pool(SHAPES, 1)
    fmt.write_rows(store["32x32"], 0, [loader_data.make_sample(i, SHAPES, pool) for i in range(7)])  # row 7 unset
    group = shards.open_store(tmp_path / "z", mode="r")["32x32"]
    assert group["latent"].chunks[0] == chunk_rows
    for lo, hi in ((0, 3), (1, 5), (3, 6), (4, 8), (6, 8), (0, 8)):
        ours, keys = fmt.read_rows(group, lo, hi, fmt.zarr_names(layout), tmp_path / "z" / "32x32")
        theirs, keys2 = fmt.read_rows(group, lo, hi)
        assert keys == keys2 == [f"k{i}" for i in range(lo, hi)] and ours.keys() == theirs.keys()
        for name in ours:
            assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), (name, lo)
        assert fmt.rows_digest(ours, keys) == fmt.rows_digest(theirs, keys2)


def test_a_zarr_shard_is_one_request_per_array(encoded):
    """encode chunks the store by shard: reading a shard by URL costs one request per array (and the group's
    metadata once), not one per sample."""
    names = fmt.zarr_names(SHAPES.layout)
    server = LatencyServer(encoded, latency_ms=0, max_requests=1000, max_seconds=60)
    with server as url:
        data = feed.open_data(data_config(f"{url}/encode", "zarr"))
        data.read.load(0)  # opens the group and its arrays
        before = server.requests
        got = data.read.load(1)
        assert len(got) == 6 and server.requests - before == len(names)


def test_read_ahead_loads_in_order_and_raises_a_failure_at_its_turn():
    loaded = []

    def load(n):
        loaded.append(n)
        if n == 2:
            raise DataError("shard 2 is damaged")
        return [f"s{n}"]

    read = ReadAhead(load, [0, 1, 2, 3], depth=3)
    assert list(read(0)) == [(0, "s0")]
    assert list(read(1)) == [(0, "s1")]  # shard 2 failed in the background; nothing raised yet
    with pytest.raises(DataError, match="shard 2"):
        read(2)
    assert sorted(loaded) == [0, 1, 2, 3]
    assert list(read(7)) == [(0, "s7")]  # not planned: loaded when asked


def test_a_shard_is_let_go_after_its_last_needed_sample():
    closed = []

    def read(n):
        try:
            for j in range(4):
                yield j, (n, j)
        finally:
            closed.append(n)

    plan = [((0, 0), (0, 1)), ((1, 0), (1, 1)), ((0, 2), (1, 2))]  # shard 0's sample 3 is never needed
    it = D.stream_batches(plan, read)
    next(it)
    gc.collect()
    assert closed == [0]  # read at its first use up to its last needed sample (2), not beyond, and let go
    assert [[s for s in b] for b in it] == [[(1, 0), (1, 1)], [(0, 2), (1, 2)]]
    gc.collect()
    assert sorted(closed) == [0, 1]
    assert D.shard_order(plan) == [0, 1]


# ---------------------------------------------------------------- encode's output by URL


def test_tar_and_zarr_by_url_stream_what_the_folder_streams(encoded):
    local = {s: stream(data_config(encoded / "encode", s)) for s in ("wds", "zarr")}
    assert local["wds"] == local["zarr"] and sum(len(b) for b in local["wds"]) == 20
    with LatencyServer(encoded, latency_ms=5, max_requests=5000, max_seconds=120) as url:
        for source in ("wds", "zarr"):
            assert stream(data_config(f"{url}/encode", source)) == local[source], source
        pattern = f"{url}/encode/shards/32x32/{{000000..000003}}.tar"  # --shards URLs, index from the folder
        assert stream(data_config(encoded / "encode", "wds", shards=(pattern,))) == local["wds"]


def test_damage_behind_a_url_is_named(encoded, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(encoded / "encode", copy / "encode")
    tar = copy / "encode" / "shards" / "32x32" / "000002.tar"
    tar.write_bytes(tar.read_bytes()[:-1024] + b"\x01" * 1024)
    with LatencyServer(copy, latency_ms=1, max_requests=5000, max_seconds=120) as url:
        with pytest.raises(DataError, match=r"000002\.tar: not the shard encode wrote"):
            stream(data_config(f"{url}/encode", "wds"))
        index = copy / "encode" / "index.json"
        data = json.loads(index.read_text())
        data["tag_frequency"] = {"x": 1}
        index.write_text(json.dumps(data))
        with pytest.raises(InputError, match=r"index\.json: changed since it was written"):
            feed.open_data(data_config(f"{url}/encode", "wds"))
        with pytest.raises(InputError, match="unreadable"):
            feed.open_data(data_config(f"{url}/nothing-here", "wds"))


def test_the_latency_server_is_bounded(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    import fsspec

    with LatencyServer(tmp_path, latency_ms=0, max_requests=2, max_seconds=60) as url:
        fs = fsspec.filesystem("http")
        assert fs.cat_file(f"{url}/f") == b"x" and fs.cat_file(f"{url}/f") == b"x"
        with pytest.raises(Exception, match="503|budget"):
            fs.cat_file(f"{url}/f")


def test_http_get_reads_whole_objects_and_names_a_missing_one(encoded):
    """http(s) objects are read by location.http_get (a buffer of the Content-Length); a 404 is
    FileNotFoundError (a zarr chunk never written, read as the fill value), a refused connection an OSError."""
    from shared.formats import location

    tar = encoded / "encode" / "shards" / "32x32" / "000000.tar"
    with LatencyServer(encoded, latency_ms=0, max_requests=10, max_seconds=60) as url:
        got = location.read_bytes(f"{url}/encode/shards/32x32/000000.tar")
        assert bytes(got) == tar.read_bytes() and got.flags.writeable
        with pytest.raises(FileNotFoundError):
            location.http_get(f"{url}/encode/nothing.tar")
        assert shards.read_objects([f"{url}/encode/nothing", f"{url}/encode/index.json"])[0] is None
    with pytest.raises(OSError):
        location.http_get(url + "/encode/index.json")  # the server is gone


# ---------------------------------------------------------------- buffers reused from shard to shard


def _address(array) -> int:
    return np.asarray(array).__array_interface__["data"][0]


@pytest.mark.parametrize("hold", ["slice", "memoryview", "torch", "frombuffer"])
def test_a_pooled_buffer_is_reused_only_once_nothing_refers_to_it(hold):
    import torch

    from shared.formats.buffers import BufferPool

    size = 3 << 20
    pool = BufferPool(limit=3)
    first = pool.take(size)
    first[:] = 7
    kept = {"slice": lambda a: a[10:2000],
            "memoryview": lambda a: memoryview(a)[10:2000],
            "torch": lambda a: torch.from_numpy(a[10:2000]),
            "frombuffer": lambda a: np.frombuffer(memoryview(a), np.uint16, 995, 10)}[hold](first)
    del first
    others = [pool.take(size), pool.take(size - 5)]  # the first buffer is still referenced: never handed out
    for other in others:
        assert len(other) in (size, size - 5) and not np.shares_memory(other, np.asarray(kept))
        other[:] = 0
    assert (np.asarray(kept) == (7 if hold != "frombuffer" else 0x0707)).all()
    assert pool.allocated == 3
    addresses = {_address(o) for o in others}
    del others
    again = pool.take(size)  # now free: reused, nothing new allocated
    assert pool.allocated == 3 and _address(again) in addresses
    del kept
    gc.collect()
    assert [len(pool.take(size)) for _ in range(3)] == [size] * 3 and pool.allocated == 3  # all three free
    assert len(pool.take(100)) == 100 and pool.allocated == 3  # small requests are not pooled


def test_shard_buffers_are_reused_without_changing_samples_still_held(encoded, monkeypatch):
    from shared.formats import buffers

    monkeypatch.setattr(buffers, "MIN_BYTES", 1)  # the test's shards are small: pool them anyway
    for source in ("wds", "zarr"):
        data = feed.open_data(data_config(encoded / "encode", source))
        reader = data.read
        held = reader.load(0)
        copies = [(np.array(s.latent), np.array(s.te)) for s in held]
        for _ in range(3):  # every other shard, several times: their buffers are reused among themselves
            for number in range(1, len(reader.infos)):
                loaded = reader.load(number)
                assert all(s.latent.base is not None for s in loaded[:1])
                del loaded
        assert [(np.array_equal(s.latent, a), np.array_equal(s.te, b)) for s, (a, b) in zip(held, copies)] \
            == [(True, True)] * len(held), source
        made = reader.buffers.allocated
        del held
        for number in range(len(reader.infos)):
            reader.load(number)
        assert reader.buffers.allocated == made, source  # shard 0's buffers came back to the pool


def test_a_shards_last_waiting_samples_are_detached_so_its_buffer_is_freed():
    import weakref

    class Buffer:  # stands for a shard's bytes
        pass

    class Item:
        def __init__(self, n, j, buffer=None):
            self.n, self.j, self.buffer = n, j, buffer

    buffers: dict[int, weakref.ref] = {}

    def read(n):
        buffer = Buffer()
        buffers[n] = weakref.ref(buffer)
        items = [Item(n, j, buffer) for j in range(8)]
        del buffer
        yield from enumerate(items)

    # shard 0's sample 7 waits until the end; shard 1 is read meanwhile
    plan = [((0, 0), (0, 1)), ((0, 2), (0, 3)), ((0, 4), (0, 5)), ((0, 6), (1, 0)), ((1, 1), (1, 2)),
            ((1, 3), (1, 4)), ((1, 5), (1, 6)), ((1, 7), (0, 7))]
    detached = []

    def detach(item):
        detached.append((item.n, item.j))
        return Item(item.n, item.j)

    got = []
    for batch in D.stream_batches(plan, read, detach):
        got.append([(i.n, i.j) for i in batch])
        del batch
        gc.collect()
        if len(got) < 3:
            assert detached == [] and buffers[0]() is not None
        if len(got) == 4:  # after batch 3, 2 of shard 0's 8 samples waited (a quarter): detached, buffer freed
            assert detached == [(0, 6), (0, 7)] and buffers[0]() is None
    assert got == [list(b) for b in plan]
    assert detached == [(0, 6), (0, 7), (1, 7)]  # shard 1's last one too, once it alone waited
    without = [[(i.n, i.j) for i in b] for b in D.stream_batches(plan, read)]
    assert without == got


# ---------------------------------------------------------------- a local shard hashed once per reader


def _counting_checks(monkeypatch):
    from stages.train import reader as R

    calls = []
    real_sha, real_digest = R.hashlib.sha256, fmt.rows_digest
    monkeypatch.setattr(R, "hashlib", type("H", (), {"sha256": staticmethod(
        lambda data=b"": calls.append("sha256") or real_sha(data))}))
    monkeypatch.setattr(R.fmt, "rows_digest", lambda *a: calls.append("digest") or real_digest(*a))
    return calls


@pytest.mark.parametrize("source", ["wds", "zarr"])
def test_a_local_shard_is_hashed_once_then_again_after_any_change(encoded, tmp_path, monkeypatch, source):
    import os
    import time

    from stages.train import reader as R

    copy = tmp_path / "encode"
    shutil.copytree(encoded / "encode", copy)
    calls = _counting_checks(monkeypatch)
    reader = feed.open_data(data_config(copy, source)).read
    first = [s.key for s in reader.load(0)]
    assert [s.key for s in reader.load(0)] == first and len(calls) == 2  # just written: "racy", checked again

    monkeypatch.setattr(R, "RACY_SECONDS", 0.0)
    time.sleep(0.01)
    calls.clear()
    assert [s.key for s in reader.load(0)] == first and len(calls) == 1  # checked, remembered
    for _ in range(2):
        assert [s.key for s in reader.load(0)] == first and len(calls) == 1  # unchanged: not hashed again

    # touched while being read (its change time moves): what was read is checked
    real_read = R.location.read_bytes

    def touching(where, alloc=None):
        data = real_read(where, alloc)
        os.utime(where)
        return data

    monkeypatch.setattr(R.location, "read_bytes", touching)
    monkeypatch.setattr(R.shards, "read_objects",
                        lambda urls, alloc=None: [touching(u, alloc) if Path(u).exists() else None for u in urls])
    assert [s.key for s in reader.load(0)] == first and len(calls) == 2
    monkeypatch.undo()

    # edited in place, same size, modification time put back: the change time tells, the check refuses it
    calls = _counting_checks(monkeypatch)
    monkeypatch.setattr(R, "RACY_SECONDS", 0.0)
    time.sleep(0.01)
    reader.load(0)
    reader.load(0)
    assert len(calls) == 1
    victim = (copy / "shards" / "32x32" / "000000.tar" if source == "wds"
              else next(p for p in sorted((copy / "zarr" / "32x32" / "latent" / "c" / "0").rglob("*")) if p.is_file()))
    st = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match="re-encode"):
        reader.load(0)


def test_shards_by_url_have_no_identity_to_remember():
    from stages.train.reader import CheckedFiles

    assert CheckedFiles.identity(["http://127.0.0.1:1/x.tar"]) is None
    assert CheckedFiles.identity(["pipe:cat x.tar"]) is None


@pytest.mark.parametrize("source", ["wds", "zarr"])
def test_samples_kept_for_the_whole_run_do_not_keep_their_shards(encoded, source):
    from stages.train import holdout

    data = feed.open_data(data_config(encoded / "encode", source))
    fixed = feed.first_samples(data, 3)
    held = holdout.with_samples(data, holdout.Holdout(["x", "y"], [(0, 1), (3, 0)], []))
    for sample in fixed + held.samples:  # copies, not views of a shard's buffer
        assert sample.latent.flags.owndata and sample.te.flags.owndata and sample.pooled.flags.owndata
    assert [s.key for s in fixed] == [s.key for _, s in list(data.read(0))[:3]]
    loaded = data.read.load(3)
    assert held.samples[1].key == loaded[0].key and np.array_equal(held.samples[1].latent, loaded[0].latent)
