"""The encode stage: its pure per-item functions on hand-made inputs; what is stored per item (checked against
independent computations), formats, reruns, kill -9 resumption, 2 ranks vs 1, the precision policy, CLIP."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.core import artifacts
from shared.models import loading as models
from shared.formats import shards
from shared.core.config import resolve
from shared.core.errors import ConfigError, DataError
from shared.images import load_planned
from shared.formats.jsonl import read_jsonl
from shared.core.stage import decide
from shared.formats.plan import PlanRow
from shared.formats.samples import WINDOW_TOKENS
from shared.models.text import encode_caption, time_ids
from stages import bucket, encode, ingest
from stages.cli import app
from stages.encode import items, writer
from tests.conftest import caption, make_dataset, noise_image, save

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"max_area": 128 * 128, "min_side": 64, "max_side": 256, "max_upscale": 4.0}
OPTS = {"model": "builtin:tiny", "shard_samples": 3, "batch_size": 2, "workers": 0, "decoder": "pil"}


# ---------------------------------------------------------------- pure per-item functions, hand-made inputs

#: 300x200 covered into 128x96: scale 0.48 -> 144x96, cropped 16 px from the left (not centred)
ROW = PlanRow(id="item1", path="a.png", source="/src", width=300, height=200, caption="a, b, c, d",
              tags=("a", "b", "c", "d"), tag_weight=0.5, repeats=2, bucket=(128, 96), resize=(144, 96), crop=(16, 0),
              scale=0.48)


def test_caption_variants_keep_the_leading_tags_and_are_seeded_per_item():
    got = items.caption_variants(ROW, 3, keep_tags=1, tag_join=", ", seed=0)
    assert got[0] == "a, b, c, d" and len(got) == 4
    assert all(v.split(", ")[0] == "a" and sorted(v.split(", ")) == ["a", "b", "c", "d"] for v in got[1:])
    assert items.caption_variants(ROW, 3, 1, ", ", 0) == got  # the same on every rank and rerun
    assert items.caption_variants(ROW, 3, 1, ", ", 1) != got
    assert items.caption_variants(ROW, 1, 4, "|", 0) == ["a, b, c, d", "a|b|c|d"]  # all kept: order as written
    assert items.caption_variants(dataclasses.replace(ROW, caption=None), 0, 1, ", ", 0) == [""]
    assert items.item_seed(0, "item1", "variants") != items.item_seed(0, "item1", "latent")


def test_conditioning_is_heights_first_and_mirrors_the_crop():
    c = items.conditioning(ROW)
    assert c["original_size"] == (200, 300) and c["crop_top_left"] == (0, 16) and c["target_size"] == (96, 128)
    assert c["time_ids"] == (200.0, 300.0, 0.0, 16.0, 96.0, 128.0)
    assert c["time_ids_flip"] == (200.0, 300.0, 0.0, 0.0, 96.0, 128.0)  # 144 - 16 - 128: the other side


def test_pack_sample_pads_variants_to_the_longest_and_stores_the_dtype():
    n = WINDOW_TOKENS
    texts = [items.Text("a, b", np.full((2 * n, 4), 1.5, np.float32), np.ones(3, np.float32),
                        np.full((2, 2 * n), 7, np.int32), 2, False),
             items.Text("b, a", np.full((n, 4), 2.5, np.float32), np.zeros(3, np.float32),
                        np.full((2, n), 9, np.int32), 1, True)]
    image, text = np.array([0.6, 0.8], np.float32), np.array([1.0, 0.0], np.float32)
    s = items.pack_sample(ROW, np.ones((4, 12, 16), np.float32), texts, "float16",
                          latent_flip=np.zeros((4, 12, 16), np.float32), token_ids=True, clip=(image, text))
    assert s.key == "item1" and s.windows == (2, 1) and s.variants == ("a, b", "b, a")
    assert s.te.shape == (2, 2 * n, 4) and s.te.dtype == np.float16 and s.latent.dtype == np.float16
    assert (s.te[0] == 1.5).all() and (s.te[1, :n] == 2.5).all() and not s.te[1, n:].any()
    assert s.ids.shape == (2, 2, 2 * n) and (s.ids[1, :, :n] == 9).all() and not s.ids[1, :, n:].any()
    assert s.pooled.shape == (2, 3) and s.latent_flip.dtype == np.float16
    assert s.clip_similarity == 0.6 and s.clip_image.dtype == np.float32
    assert (s.tag_weight, s.repeats, s.bucket, s.tags) == (0.5, 2, (128, 96), ("a", "b", "c", "d"))
    assert s.time_ids_flip[3] == 0.0
    assert not s.prior  # an instance image; a class source's row makes a prior (DreamBooth class) sample
    assert items.pack_sample(dataclasses.replace(ROW, role="class"), np.ones((4, 12, 16), np.float32), texts[1:],
                             "float32").prior
    plain = items.pack_sample(ROW, np.ones((4, 12, 16), np.float32), texts[1:], "float32")
    assert plain.ids is None and plain.latent_flip is None and plain.clip_image is None
    assert plain.te.shape == (1, n, 4) and plain.te.dtype == np.float32


def test_shards_are_runs_of_one_bucket_in_bucket_order():
    rows = [dataclasses.replace(ROW, id=f"i{k}", bucket=b)
            for k, b in enumerate([(128, 96), (96, 128), (128, 96), (128, 96), (96, 128)])]
    plan = writer.plan_shards(rows, 2)
    assert [(s.number, s.bucket, s.index, s.first, [r.id for r in s.rows]) for s in plan] == [
        (0, (96, 128), 0, 0, ["i1", "i4"]), (1, (128, 96), 0, 0, ["i0", "i2"]), (2, (128, 96), 1, 2, ["i3"])]
    assert plan[2].name == "128x96/000001" and plan[2].tar == "shards/128x96/000001.tar"


# ---------------------------------------------------------------- the stage on builtin:tiny


def prepare(root: Path, count: int = 10) -> Path:
    """ingest + bucket of `count` captioned noise images into root/w; returns the workdir."""
    make_dataset(root / "src", count=count)
    work = root / "w"
    ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(root / "src"),), "workdir": work,
                                                    "workers": 1, "min_side": 64}))
    bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, **SMALL}))
    return work


def run_encode(work: Path, **kw) -> object:
    return encode.run(resolve(encode.Config, "encode", {}, {"workdir": work, **OPTS, **kw}))


def samples_of(out: Path) -> dict[str, dict]:
    found = {}
    for tar in sorted((out / "shards").rglob("*.tar")):
        for s in shards.read_tar(tar):
            found[s["__key__"]] = s
    return found


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    work = prepare(root)
    manifest = run_encode(work, format="both", caption_variants=2, flip=True, token_ids=True)
    return work, manifest


def test_every_planned_item_is_stored_once_in_both_formats(encoded):
    work, manifest = encoded
    out = work / "encode"
    plan = list(read_jsonl(work / "bucket" / "plan.jsonl"))
    found = samples_of(out)
    assert sorted(found) == sorted(i["id"] for i in plan)
    assert manifest.counts == {"in": len(plan), "out": len(plan), "dropped": {}}
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == len(plan)
    store = shards.open_store(out / "zarr", mode="r")
    for b in index["buckets"]:
        group = store[f"{b['bucket'][0]}x{b['bucket'][1]}"]
        keys = group.attrs["keys"]
        assert len(keys) == b["samples"] == sum(s["samples"] for s in b["shards"])
        for s in b["shards"]:
            tar = out / s["name"]
            assert tar.stat().st_size == s["bytes"] and artifacts.sha256_file(tar) == s["sha256"]
        # one chunk per shard: every array's chunk holds a shard's rows (all of them when the bucket is smaller)
        rows = max(s["samples"] for s in b["shards"])
        assert all(s["first"] % rows == 0 for s in b["shards"])
        assert {group[name].chunks[0] for name in group.array_keys()} == {rows}
        for k, key in enumerate(keys):
            sample = found[key]
            assert np.array_equal(group["latent"][k], sample["latent.npy"])
            assert np.array_equal(group["latent_flip"][k], sample["latent_flip.npy"])
            n = sample["te.npy"].shape[1]
            assert np.array_equal(group["te"][k][:, :n], sample["te.npy"])
            assert not group["te"][k][:, n:].any()
            assert list(group["te_windows"][k]) == sample["json"]["windows"]
            assert np.array_equal(group["pooled"][k], sample["pooled.npy"])
            assert np.array_equal(group["ids"][k][:, :, :n], sample["ids.npy"])
            assert list(group["time_ids"][k]) == sample["json"]["time_ids"]
    assert not list(out.rglob("*.partial")) and len(list((out / "done").glob("*/*.json"))) == manifest.extra["shards"]


def test_stored_arrays_match_an_independent_computation(encoded):
    work, _ = encoded
    found = samples_of(work / "encode")
    tiny = models.load_model("builtin:tiny")
    for item in list(read_jsonl(work / "bucket" / "plan.jsonl"))[:3]:
        s = found[item["id"]]
        pixels = load_planned(str(Path(item["source"]) / item["path"]), item["resize"], item["crop"], item["bucket"])
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            want = tiny.vae.encode(x).latent_dist.mean[0] * tiny.vae.config.scaling_factor
            want_flip = tiny.vae.encode(x.flip(-1)).latent_dist.mean[0] * tiny.vae.config.scaling_factor
        assert s["latent.npy"].shape == (4, item["bucket"][1] // 8, item["bucket"][0] // 8)
        np.testing.assert_allclose(s["latent.npy"].astype(np.float32), want.numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(s["latent_flip.npy"].astype(np.float32), want_flip.numpy(), atol=2e-3, rtol=2e-3)
        assert not np.allclose(s["latent_flip.npy"], s["latent.npy"][..., ::-1], atol=1e-2)
        meta = s["json"]
        assert meta["variants"][0] == item["caption"] and len(meta["variants"]) == 3
        for v, text in enumerate(meta["variants"]):
            tags = [t.strip() for t in text.split(",")]
            assert tags[0] == item["tags"][0] and sorted(tags) == sorted(item["tags"])
            hidden, pooled = encode_caption(tiny, text, 3)
            n = hidden.shape[0]
            np.testing.assert_allclose(s["te.npy"][v, :n].astype(np.float32), hidden.numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(s["pooled.npy"][v].astype(np.float32), pooled.numpy(), atol=2e-3, rtol=2e-3)
        left, top = item["crop"]
        assert meta["time_ids"] == time_ids((item["height"], item["width"]), (top, left),
                                            (item["bucket"][1], item["bucket"][0]))
        assert meta["time_ids_flip"][3] == item["resize"][0] - left - item["bucket"][0]


def test_empty_caption_is_stored_once(encoded):
    work, _ = encoded
    tiny = models.load_model("builtin:tiny", parts=("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    hidden, pooled = encode_caption(tiny, "")
    np.testing.assert_allclose(np.load(work / "encode" / "empty" / "te.npy").astype(np.float32), hidden.numpy(),
                               atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(np.load(work / "encode" / "empty" / "pooled.npy").astype(np.float32),
                               pooled.numpy(), atol=2e-3, rtol=2e-3)


def test_webdataset_reads_the_shards(encoded):
    import webdataset as wds

    work, _ = encoded
    tars = sorted(str(p) for p in (work / "encode" / "shards").rglob("*.tar"))
    got = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert len(got) == len(samples_of(work / "encode"))
    assert {"latent.npy", "te.npy", "pooled.npy", "json"} <= set(got[0])


def test_rerun_skips_and_changes_say_why(encoded, runner):
    work, _ = encoded
    args = ["encode", "--workdir", str(work), "--model", "builtin:tiny", "--shard-samples", "3", "--batch-size",
            "2", "--workers", "0", "--decoder", "pil", "--format", "both", "--caption-variants", "2", "--flip",
            "--token-ids"]
    same = runner.invoke(app, args)
    assert same.exit_code == 0 and "encode: unchanged, skipped" in same.output, same.output
    vae = work / "other-vae"
    shutil.copytree(models.builtin_folder("tiny") / "vae", vae)
    tampered = vae / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file
    weights = load_file(tampered)
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, tampered)
    plan = decide(encode.STAGE, resolve(encode.Config, "encode", {}, {
        "workdir": work, **OPTS, "format": "both", "caption_variants": 2, "flip": True, "token_ids": True,
        "vae": str(vae)}))
    assert plan.reasons == ["input changed: model (weights of builtin:tiny)"]
    fewer = decide(encode.STAGE, resolve(encode.Config, "encode", {}, {
        "workdir": work, **OPTS, "format": "both", "caption_variants": 1, "flip": True, "token_ids": True}))
    assert fewer.reasons == ["config changed: caption_variants 2 -> 1"]


def test_missing_model_and_unsafe_fp16_vae_are_config_errors(tmp_path, runner):
    work = prepare(tmp_path, count=3)
    no_model = runner.invoke(app, ["encode", "--workdir", str(work)])
    assert no_model.exit_code == 2 and "encode needs a model" in no_model.stderr
    fp16 = runner.invoke(app, ["encode", "--workdir", str(work), "--model", "builtin:tiny", "--vae-dtype", "float16"])
    assert fp16.exit_code == 2 and "not marked fp16-safe" in fp16.stderr
    missing = runner.invoke(app, ["encode", "--workdir", str(work), "--model", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not found" in missing.stderr


def test_nan_latents_fail_naming_the_fp32_fix(tmp_path, monkeypatch):
    work = prepare(tmp_path, count=3)
    real = encode.Encoders.latents

    def poisoned(self, pixels, ids, flipped=False):
        self.model.vae.encoder.conv_in.weight.data.fill_(float("nan"))
        return real(self, pixels, ids, flipped)

    monkeypatch.setattr(encode.Encoders, "latents", poisoned)
    with pytest.raises(DataError, match="--vae-dtype float32"):
        run_encode(work)


def test_long_captions_are_windowed_or_cut_and_counted(tmp_path):
    root = tmp_path
    save(noise_image(128, 128, 3), root / "src" / "a.png")
    caption(root / "src" / "a.png", ", ".join(f"tag{i}" for i in range(120)))
    work = root / "w"
    ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(root / "src"),), "workdir": work,
                                                    "workers": 1, "min_side": 64}))
    bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, **SMALL}))
    m = run_encode(work, max_windows=2)
    (s,) = samples_of(work / "encode").values()
    assert s["te.npy"].shape[1] == 2 * 77 and m.extra["truncated_captions"] == 1
    m = run_encode(work, max_windows=8)
    (s,) = samples_of(work / "encode").values()
    assert s["te.npy"].shape[1] > 2 * 77 and m.extra["truncated_captions"] == 0


def _sdxl(args: list[str], env: dict | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (prefix or [sys.executable, "-m"]) + ["stages.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "SDXL_PROGRESS": "0", **(env or {})})


def _cli_args(work: Path) -> list[str]:
    return ["encode", "--workdir", str(work), "--model", "builtin:tiny", "--format", "both", "--shard-samples", "3",
            "--batch-size", "2", "--workers", "0", "--decoder", "pil", "--caption-variants", "1"]


def _content(out: Path) -> dict:
    """Everything encode produced that must not depend on how it ran: tar bytes, zarr arrays, empty/, index."""
    index = json.loads((out / "index.json").read_text())
    content = {"index": index, "empty": {p.name: p.read_bytes() for p in (out / "empty").iterdir()},
               "tars": {str(p.relative_to(out)): p.read_bytes() for p in (out / "shards").rglob("*.tar")}}
    store = shards.open_store(out / "zarr", mode="r")
    for b in index["buckets"]:
        name = f"{b['bucket'][0]}x{b['bucket'][1]}"
        content[name] = {k: store[name][k][:].tobytes() for k in sorted(store[name].array_keys())}
    return content


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process CLI run (OMP threads as torchrun sets them, see the 2-rank test)."""
    root = tmp_path_factory.mktemp("ref")
    work = prepare(root, count=11)
    result = _sdxl(_cli_args(work), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return root, _content(work / "encode")


def test_kill_9_then_rerun_resumes_to_the_same_content(tmp_path, reference):
    """Killed at three points in a row, each run resuming the previous one's staging folder: in the first batch
    (nothing finished), mid-way (some shards marked done) and between a shard's rename and its done marker;
    then a run that completes gives the uninterrupted run's bytes."""
    ref_root, want = reference
    shutil.copytree(ref_root / "src", tmp_path / "src")
    work = tmp_path / "w"
    shutil.copytree(ref_root / "w" / "ingest", work / "ingest")
    shutil.copytree(ref_root / "w" / "bucket", work / "bucket")
    done_before: list = []
    for point in ("encode.batch:1", "encode.batch:4", "encode.shard:2", None):
        env = {"OMP_NUM_THREADS": "1", **({"SDXL_FAULT": point} if point else {})}
        result = _sdxl(_cli_args(work), env=env)
        if done_before:
            assert f"resuming: {len(done_before)} of" in result.stdout, (point, result.stdout)
        if point is None:
            break
        assert result.returncode == -9, (point, result.stderr[-2000:])
        assert not (work / "encode").exists() and (work / "encode.staging").exists()
        done_before = list((work / "encode.staging").rglob("done/*/*.json"))
    assert result.returncode == 0, result.stderr
    assert len(done_before) >= 2  # the last kill came after shards were marked done
    assert _content(work / "encode") == want
    assert not list((work / "encode").rglob("*.partial"))


def test_two_ranks_give_byte_identical_output(tmp_path, reference):
    """torchrun, 2 CPU processes: the same tar bytes, zarr arrays, empty embedding and index as 1 process.
    The ranks coordinate through marker files (no collective), so no process group is needed."""
    ref_root, want = reference
    work = tmp_path / "w"
    shutil.copytree(ref_root / "w" / "ingest", work / "ingest")
    shutil.copytree(ref_root / "w" / "bucket", work / "bucket")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                "-m"]
    result = _sdxl(_cli_args(work), prefix=torchrun, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "encode rank 1:" in result.stdout
    assert _content(work / "encode") == want


def test_clip_embeddings_and_summary(tmp_path):
    work = prepare(tmp_path, count=4)
    m = run_encode(work, clip=True, format="both")
    found = samples_of(work / "encode")
    for s in found.values():
        image, text = s["clip_image.npy"], s["clip_text.npy"]
        assert abs(np.linalg.norm(image) - 1) < 1e-5 and abs(np.linalg.norm(text) - 1) < 1e-5
        assert abs(float(image @ text) - s["json"]["clip_similarity"]) < 1e-5
    summary = m.extra["clip"]
    sims = [s["json"]["clip_similarity"] for s in found.values()]
    assert summary["min"] == pytest.approx(min(sims), abs=1e-6) and summary["mean"] == pytest.approx(np.mean(sims), abs=1e-5)
    assert summary["lowest"][0]["similarity"] == pytest.approx(min(sims), abs=1e-6)
    with pytest.raises(ConfigError, match="--clip-model"):
        encode.Encoders(resolve(encode.Config, "encode", {}, {"workdir": work, **OPTS, "clip": True,
                                                              "model": str(models.builtin_folder("tiny"))}), "cpu")
