"""Incremental encode: a rerun after images were added (and a caption changed) encodes only the new and changed
items, takes the others from the previous output, and gives the same bytes as a fresh encode of the new
dataset, also after a kill -9, under two ranks, and with a damaged previous shard. Runs go through the CLI with
OMP_NUM_THREADS=1, as tests/test_encode.py's reference does (the CPU thread count changes the last bits)."""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.core.config import resolve
from shared.formats import samples as fmt
from shared.formats.jsonl import read_jsonl
from shared.formats.shard_index import ShardEntry
from stages import bucket, encode, ingest
from stages.encode import items, reuse
from stages.encode.writer import ShardRecord
from tests.conftest import caption, make_dataset, noise_image, save
from tests.test_encode import ROW, SMALL, _content, _sdxl

CLI = ["--model", "builtin:tiny", "--format", "both", "--shard-samples", "8", "--batch-size", "4", "--workers", "0",
       "--decoder", "pil", "--caption-variants", "1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- what a sample key covers


def test_sample_key_covers_what_shapes_the_arrays_and_nothing_else():
    run = "r"
    key = reuse.sample_key(ROW, run)
    shaping = [dict(sha256="other"), dict(crop=(0, 0)), dict(resize=(150, 100)), dict(bucket=(96, 128)),
               dict(caption="a, b"), dict(tags=("a",)), dict(id="item2"), dict(orientation=6),
               dict(extra={"new_field": 1})]
    for change in shaping:
        assert reuse.sample_key(dataclasses.replace(ROW, **change), run) != key, change
    descriptive = dict(tag_weight=0.9, repeats=3, path="moved/a.png", source="/elsewhere", caption_path="a.txt")
    assert reuse.sample_key(dataclasses.replace(ROW, **descriptive), run) == key
    assert reuse.sample_key(ROW, "another run") != key


def test_run_key_covers_options_models_code_and_numerics_but_not_storage(tmp_path):
    def cfg(**kw):
        return resolve(encode.Config, "encode", {}, {"workdir": tmp_path, "model": "builtin:tiny", **kw})

    inputs = {"bucket": {"fingerprint": "plan"}, "model": {"fingerprint": "m"}, "decoder": {"fingerprint": "pil"}}
    numerics = {"batch_size": 8, "device": "cpu, 1 threads"}
    base = reuse.run_key(cfg(), inputs, "code", numerics)
    for other in (cfg(flip=True), cfg(caption_variants=1), cfg(storage_dtype="float32"), cfg(seed=1)):
        assert reuse.run_key(other, inputs, "code", numerics) != base
    for same in (cfg(format="both"), cfg(shard_samples=3), cfg(zarr_level=1), cfg(workers=0), cfg(reuse=False)):
        assert reuse.run_key(same, inputs, "code", numerics) == base
    assert reuse.run_key(cfg(), {**inputs, "bucket": {"fingerprint": "new plan"}}, "code", numerics) == base
    assert reuse.run_key(cfg(), {**inputs, "model": {"fingerprint": "m2"}}, "code", numerics) != base
    assert reuse.run_key(cfg(), inputs, "code2", numerics) != base
    assert reuse.run_key(cfg(), inputs, "code", {**numerics, "batch_size": 4}) != base


def test_a_reused_sample_is_described_by_its_current_row():
    n = fmt.WINDOW_TOKENS
    texts = [items.Text("a, b, c, d", np.full((n, 4), 1.5, np.float32), np.ones(3, np.float32),
                        np.full((2, n), 7, np.int32), 1, False)]
    clip = (np.array([0.6, 0.8], np.float32), np.array([0.28, 0.96], np.float32))
    old = items.pack_sample(ROW, np.ones((4, 12, 16), np.float32), texts, "float16", clip=clip)
    now = dataclasses.replace(ROW, tag_weight=1.7, repeats=4, path="moved/a.png")
    want = items.pack_sample(now, np.ones((4, 12, 16), np.float32), texts, "float16", clip=clip)
    stored = dataclasses.replace(old, clip_similarity=float(np.float32(old.clip_similarity)))  # as a zarr row
    got = items.described(now, ["a, b, c, d"], stored)
    assert fmt.to_tar(got)["json"] == fmt.to_tar(want)["json"]
    assert (got.tag_weight, got.repeats, got.path, got.clip_similarity) == (1.7, 4, "moved/a.png", 0.936)


def test_shard_record_keeps_sample_keys_and_reads_older_records():
    entry = ShardEntry(shard=0, first=0, samples=2, repeats=(1, 1), content_sha256="c", keys=("a", "b"))
    record = ShardRecord(entry, (64, 64), {"t": 2}, 1, None, ("ka", "kb"), (1, 0), 1)
    assert ShardRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    older = {k: v for k, v in record.to_json().items() if k not in ("sample_keys", "cuts", "reused")}
    assert ShardRecord.from_json(older).sample_keys == ()


def test_an_items_arrays_do_not_depend_on_its_batch_neighbours(tmp_path):
    """The premise of reuse: every model call has a fixed batch shape, so an item encoded beside others equals
    the item encoded alone (at batch size 1 the CPU kernels take another path: this failed before padding)."""
    cfg = resolve(encode.Config, "encode", {}, {"workdir": tmp_path, "model": "builtin:tiny", "batch_size": 4})
    enc = encode.Encoders(cfg, "cpu")
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    alone = enc.latents(pixels[:1], ["x"])
    beside = enc.latents(pixels[[1, 2, 0]], ["y", "z", "x"])
    assert alone.tobytes() == beside[2].tobytes()
    captions = ["a cat", "tag, " * 90 + "end", "a dog on a sofa", ""]
    one = enc.texts(captions[:1])[0]
    many = enc.texts(captions[1:] + captions[:1])[-1]
    assert one.hidden.tobytes() == many.hidden.tobytes() and one.pooled.tobytes() == many.pooled.tobytes()


# ---------------------------------------------------------------- the stage: 40 images, then 3 more and a caption


def _ingest_and_bucket(src: Path, work: Path) -> None:
    ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(src),), "workdir": work, "workers": 1,
                                                    "min_side": 64}))
    bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, **SMALL}))


def _encode_cli(work: Path, *extra: str, env: dict | None = None, prefix: list[str] | None = None):
    return _sdxl(["encode", "--workdir", str(work), *CLI, *extra], env={**ONE_THREAD, **(env or {})}, prefix=prefix)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """`old`: 40 images encoded; then 3 images added (sorted first, so every later sample moves to another
    shard position) and one caption changed; `new`: that dataset's ingest and bucket; `want`: its fresh encode."""
    root = tmp_path_factory.mktemp("incremental")
    src = make_dataset(root / "src", count=40)
    _ingest_and_bucket(src, root / "old")
    done = _encode_cli(root / "old")
    assert done.returncode == 0, done.stderr
    old = _content(root / "old" / "encode")
    for k in range(3):
        caption(save(noise_image(320, 320, seed=500 + k), src / f"img_000_new{k}.png"), f"tag{k}, common, added")
    caption(src / "img_005.png", "tag2, common, shape 1, a changed caption")
    _ingest_and_bucket(src, root / "new")
    fresh = root / "fresh"
    shutil.copytree(root / "new", fresh)
    done = _encode_cli(fresh)
    assert done.returncode == 0, done.stderr
    return root, old, _content(fresh / "encode")


def _incremental_workdir(root: Path, to: Path) -> Path:
    """The new dataset's ingest and bucket, with the old encode output at <workdir>/encode."""
    shutil.copytree(root / "new", to)
    shutil.copytree(root / "old" / "encode", to / "encode")
    return to


def test_adding_images_encodes_only_new_and_changed_items(tmp_path, datasets):
    root, old, want = datasets
    work = _incremental_workdir(root, tmp_path / "w")
    done = _encode_cli(work)
    assert done.returncode == 0, done.stderr
    assert "encode: 4 of 43 items encoded, 39 reused from" in done.stdout, done.stdout
    got = _content(work / "encode")
    assert got == want
    assert json.loads((work / "encode" / "manifest.json").read_text())["reused"] == 39
    # the new images moved every kept item's tag weight: reused samples carry the new ones (fresh == incremental)
    weight = {name: {r["id"]: r["tag_weight"] for r in read_jsonl(root / name / "bucket" / "plan.jsonl")}
              for name in ("old", "new")}
    assert any(weight["old"][i] != weight["new"].get(i, weight["old"][i]) for i in weight["old"])


def test_kill_9_during_an_incremental_run_resumes_to_the_same_content(tmp_path, datasets):
    root, old, want = datasets
    work = _incremental_workdir(root, tmp_path / "w")
    killed = _encode_cli(work, env={"SDXL_FAULT": "encode.shard:3"})
    assert killed.returncode == -9
    assert _content(work / "encode") == old  # the previous output is only read until the new one replaces it
    again = _encode_cli(work)
    assert again.returncode == 0, again.stderr
    assert "resuming: 2 of 6 shards" in again.stdout and "4 of 43 items encoded, 39 reused" in again.stdout
    assert _content(work / "encode") == want


def test_two_ranks_each_reuse_for_their_own_shards(tmp_path, datasets):
    root, _, want = datasets
    work = _incremental_workdir(root, tmp_path / "w")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29567",
                "-m"]
    done = _encode_cli(work, prefix=torchrun)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "encode rank 1:" in done.stdout and "4 of 43 items encoded, 39 reused" in done.stdout
    assert _content(work / "encode") == want


def test_a_damaged_previous_shard_is_read_from_zarr_or_encoded_again(tmp_path, datasets):
    """Old shard 1's tar is damaged but its zarr rows check out: its samples come from the rows. Shard 2's tar
    and one of its zarr rows are damaged: its samples are encoded again. Either way, the fresh encode's bytes."""
    root, _, want = datasets
    work = _incremental_workdir(root, tmp_path / "w")
    for k in (1, 2):
        tar = work / "encode" / "shards" / "128x128" / f"{k:06d}.tar"
        data = bytearray(tar.read_bytes())
        data[3000] ^= 1
        tar.write_bytes(data)
    shutil.rmtree(work / "encode" / "zarr" / "128x128" / "latent" / "c" / "2")  # shard 2's: reads back as zeros
    done = _encode_cli(work)
    assert done.returncode == 0, done.stderr
    assert "shard 128x128/000002 of" in done.stderr and "does not match its record" in done.stderr
    assert "shard 128x128/000001" not in done.stderr
    assert "encode: 12 of 43 items encoded, 31 reused from" in done.stdout, done.stdout
    assert _content(work / "encode") == want


def test_zarr_rows_are_reused_too_and_no_reuse_encodes_everything(tmp_path, datasets):
    """In this process (its own thread count, so its own reference): a zarr-only previous output feeds a run
    that writes both formats; --no-reuse then encodes every item, which is a fresh encode of the new dataset,
    and gives the same bytes."""
    root, _, _ = datasets
    opts = {"model": "builtin:tiny", "shard_samples": 8, "batch_size": 4, "workers": 0, "decoder": "pil",
            "caption_variants": 1}

    def run(work: Path, force: bool = False, **kw):
        return encode.run(resolve(encode.Config, "encode", {}, {"workdir": work, **opts, **kw}), force)

    shutil.copytree(root / "old", tmp_path / "old", ignore=shutil.ignore_patterns("encode"))
    run(tmp_path / "old", format="zarr")
    work = tmp_path / "w"
    shutil.copytree(root / "new", work, ignore=shutil.ignore_patterns("encode"))
    shutil.copytree(tmp_path / "old" / "encode", work / "encode")
    incremental = run(work, format="both")
    assert incremental.extra["reused"] == 39 and incremental.counts["out"] == 43
    reused = _content(work / "encode")
    assert run(work, force=True, format="both", reuse=False).extra["reused"] == 0
    assert _content(work / "encode") == reused
