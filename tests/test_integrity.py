"""What a stage reads is what its producer recorded: edited tables, flipped or swapped shard bytes, edited
indexes, tampered zarr rows, changed source images and damaged checkpoints are refused naming the file; a
finished output whose files were deleted or changed is not "unchanged" — it is rebuilt (or repaired, for the
stages that resume) to what it was."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.core import artifacts
from shared.formats import shards
from shared.core.config import resolve
from shared.core.errors import DataError, InputError
from stages import bucket, encode, export, ingest, train
from tests.conftest import caption, noise_image, save

SMALL = {"max_area": 128 * 128, "min_side": 64, "max_side": 256}
TRAIN = {"model": "builtin:tiny", "batch_size": 2, "shuffle_buffer": 4, "max_steps": 4, "checkpoint_every": 2,
         "learning_rate": 3e-3, "eval_samples": 0, "lora_rank": 4, "lora_alpha": 4.0, "tensorboard": False}


def run_ingest(src: Path, work: Path):
    return ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(src),), "workdir": work, "workers": 1,
                                                           "min_side": 64}))


def run_bucket(work: Path):
    return bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, **SMALL}))


def run_encode(work: Path, **kw):
    return encode.run(resolve(encode.Config, "encode", {}, {"workdir": work, "model": "builtin:tiny",
                                                           "shard_samples": 4, "format": "both", "workers": 0,
                                                           "decoder": "pil", **kw}))


def run_train(encoded: Path, out: Path, **kw):
    return train.run(resolve(train.Config, "train", {}, {"input": encoded, "output": out, **{**TRAIN, **kw}}))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """12 captioned images of one size -> one 128x128 bucket -> 3 shards of 4 (tar + zarr)."""
    root = tmp_path_factory.mktemp("integrity")
    for i in range(12):
        p = save(noise_image(256, 256, seed=300 + i), root / "src" / f"img_{i:02d}.png")
        caption(p, f"colour {i % 4}, shape {i % 3}")
    work = root / "w"
    run_ingest(root / "src", work)
    run_bucket(work)
    run_encode(work)
    return work


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    k = len(data) // 2 if at is None else at
    data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_encode(work: Path, dest: Path) -> Path:
    shutil.copytree(work / "encode", dest)
    return dest


# ---------------------------------------------------------------- tables and sources


@pytest.mark.parametrize("stage, table", [("bucket", "ingest/items.jsonl"), ("encode", "bucket/plan.jsonl")])
def test_a_table_cut_short_is_refused(work, tmp_path, stage, table):
    w = tmp_path / "w"
    shutil.copytree(work / table.split("/")[0], w / table.split("/")[0])
    path = w / table
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-2]), encoding="utf-8")
    with pytest.raises(InputError, match=rf"{path.name}: changed since it was written"):
        run_bucket(w) if stage == "bucket" else run_encode(w)


def test_a_source_image_changed_since_ingest_is_refused(tmp_path):
    for i in range(4):
        caption(save(noise_image(256, 256, seed=i), tmp_path / "src" / f"a{i}.png"), "x")
    w = tmp_path / "w"
    run_ingest(tmp_path / "src", w)
    run_bucket(w)
    save(noise_image(256, 256, seed=99), tmp_path / "src" / "a2.png")  # same name and size, other pixels
    with pytest.raises(DataError, match=r"a2\.png: changed since ingest recorded it"):
        run_encode(w)


def test_a_deleted_table_makes_a_finished_output_rerun(work, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(work / "ingest", w / "ingest")
    src = Path(artifacts.read_manifest(w / "ingest").config["sources"][0]["path"])
    (w / "ingest" / "rejected.jsonl").unlink()
    from shared.core.stage import decide
    cfg = resolve(ingest.Config, "ingest", {}, {"sources": (str(src),), "workdir": w, "workers": 1, "min_side": 64})
    assert decide(ingest.STAGE, cfg).reasons == ["output damaged: rejected.jsonl is missing"]
    run_ingest(src, w)
    assert (w / "ingest" / "rejected.jsonl").exists() and not decide(ingest.STAGE, cfg).reasons


# ---------------------------------------------------------------- shards


def test_flipped_or_swapped_tar_shards_stop_training_naming_the_shard(work, tmp_path):
    enc = copy_encode(work, tmp_path / "enc")
    index = json.loads((enc / "index.json").read_text())
    names = [s["name"] for b in index["buckets"] for s in b["shards"]]
    flip_byte(enc / names[1])
    with pytest.raises(DataError, match=rf"{names[1]}: not the shard encode wrote"):
        run_train(enc, tmp_path / "t1")
    shutil.copy(work / "encode" / names[0], enc / names[1])  # a whole valid shard, but not this one
    with pytest.raises(DataError, match=rf"{names[1]}: not the shard encode wrote"):
        run_train(enc, tmp_path / "t2")
    for t in ("t1", "t2"):
        assert not (tmp_path / t).exists()
        assert not list((tmp_path / f"{t}.staging").glob("checkpoints/step-*"))


@pytest.mark.parametrize("edit", ["repeats", "drop_shard"])
def test_an_edited_index_is_refused(work, tmp_path, edit):
    enc = copy_encode(work, tmp_path / "enc")
    index = json.loads((enc / "index.json").read_text())
    if edit == "repeats":
        index["buckets"][0]["shards"][0]["repeats"][0] = 5
    else:
        index["buckets"][0]["shards"].pop()
    (enc / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    with pytest.raises(InputError, match=r"index\.json: changed since it was written"):
        run_train(enc, tmp_path / "t")


def test_tampered_zarr_rows_stop_training(work, tmp_path):
    enc = copy_encode(work, tmp_path / "enc")
    chunks = enc / "zarr" / "128x128" / "latent" / "c"
    shutil.copy(chunks / "0" / "0" / "0" / "0", chunks / "1" / "0" / "0" / "0")  # shard 1's rows: shard 0's latents
    with pytest.raises(DataError, match=r"rows 4\.\.7 \(shard .*\) differ from what encode recorded"):
        run_train(enc, tmp_path / "t", source="zarr")


def test_encode_repairs_only_the_damaged_shards(work, tmp_path):
    w = tmp_path / "w"
    for stage in ("ingest", "bucket", "encode"):
        shutil.copytree(work / stage, w / stage)
    out = w / "encode"
    index = json.loads((out / "index.json").read_text())
    names = [s["name"] for b in index["buckets"] for s in b["shards"]]
    before = {n: (out / n).read_bytes() for n in names}
    zarr_before = shards.open_store(out / "zarr", mode="r")["128x128"]["te"][8:12]
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}
    (out / names[1]).unlink()
    shutil.copy(out / "zarr/128x128/te/c/0/0/0/0", out / "zarr/128x128/te/c/2/0/0/0")  # shard 2's text states
    m = run_encode(w)
    assert m.fingerprint == artifacts.read_manifest(work / "encode").fingerprint
    assert {n: (out / n).read_bytes() for n in names} == before
    assert (out / names[0]).stat().st_mtime_ns == mtimes[names[0]]  # an intact shard was not rewritten
    assert (shards.open_store(out / "zarr", mode="r")["128x128"]["te"][8:12] == zarr_before).all()
    assert json.loads((out / "index.json").read_text()) == index


# ---------------------------------------------------------------- checkpoints


def test_damaged_checkpoints_fall_back_on_resume_and_are_refused_by_export(work, tmp_path):
    reference = run_train(work / "encode", tmp_path / "ref")
    final = tmp_path / "ref" / reference.extra["final_checkpoint"]
    out = tmp_path / "t"
    shutil.copytree(tmp_path / "ref", out)
    flip_byte(out / reference.extra["final_checkpoint"] / "weights.safetensors", at=-8)
    with pytest.raises(InputError, match=r"step-000004: damaged checkpoint \(weights\.safetensors differs"):
        export.run(resolve(export.Config, "export", {}, {"input": out, "output": tmp_path / "e", "verify": False}))
    m = run_train(work / "encode", out)  # up-to-date check sees the damage; resumes from step 2
    assert (out / "checkpoints" / "step-000004.damaged").is_dir()
    a = load_file(str(final / "weights.safetensors"))
    b = load_file(str(out / m.extra["final_checkpoint"] / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
