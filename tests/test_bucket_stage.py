import json
from pathlib import Path

from shared.core.config import build
from shared.formats.jsonl import read_jsonl
from stages import bucket, ingest
from stages.cli import app
from tests.conftest import caption, make_dataset, noise_image, save


def ingested(tmp_path: Path, count: int = 12) -> Path:
    make_dataset(tmp_path / "src", count=count)
    cfg = build(ingest.Config, {"sources": (str(tmp_path / "src"),), "workdir": tmp_path / "w", "workers": 1},
                "[ingest]")
    ingest.run(cfg)
    return tmp_path / "w"


def bucket_cfg(workdir: Path, **kw) -> bucket.Config:
    return build(bucket.Config, {"workdir": workdir, **kw}, "[bucket]")


def test_plan_rows_cover_their_bucket(tmp_path):
    w = ingested(tmp_path)
    manifest = bucket.run(bucket_cfg(w, max_area=512 * 512, min_side=256, max_side=1024))
    rows = list(read_jsonl(w / "bucket" / "plan.jsonl"))
    assert len(rows) == 12 == manifest.counts["out"]
    for r in rows:
        (bw, bh), (rw, rh), (left, top) = r["bucket"], r["resize"], r["crop"]
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
        assert 0 <= left and left + bw <= rw and 0 <= top and top + bh <= rh
        assert r["caption"] and r["sha256"]          # what ingest knew travels along
    info = json.loads((w / "bucket" / "buckets.json").read_text())
    assert info["rule"]["kind"] == "generated" and sum(b["count"] for b in info["buckets"]) == 12
    assert (w / "bucket" / "buckets.png").read_bytes()[:4] == b"\x89PNG"


def test_explicit_bucket_list(tmp_path):
    w = ingested(tmp_path)
    five = [[512, 512], [576, 448], [448, 576], [640, 384], [384, 640]]
    bucket.run(bucket_cfg(w, buckets=five, max_area=512 * 512))
    used = {tuple(r["bucket"]) for r in read_jsonl(w / "bucket" / "plan.jsonl")}
    assert used <= {tuple(b) for b in five}
    info = json.loads((w / "bucket" / "buckets.json").read_text())
    assert [[b["width"], b["height"]] for b in info["buckets"]] == sorted(five, key=lambda b: b[0] / b[1])


def test_min_bucket_items_merges(tmp_path):
    w = ingested(tmp_path, count=10)
    bucket.run(bucket_cfg(w, max_area=512 * 512, min_side=256, max_side=1024, min_bucket_items=4))
    info = json.loads((w / "bucket" / "buckets.json").read_text())
    assert all(b["count"] >= 4 for b in info["buckets"] if b["count"])


def test_too_small_items_rejected_on_request(tmp_path):
    src = tmp_path / "src"
    caption(save(noise_image(300, 300, 1), src / "small.png"), "x")
    caption(save(noise_image(1024, 1024, 2), src / "big.png"), "y")
    ingest.run(build(ingest.Config, {"sources": (str(src),), "workdir": tmp_path / "w", "workers": 1}, "[ingest]"))
    m = bucket.run(bucket_cfg(tmp_path / "w", max_upscale=2.0, on_too_small="reject"))
    assert m.counts["dropped"] == {"too_small_for_bucket": 1}
    assert [r["path"] for r in read_jsonl(tmp_path / "w" / "bucket" / "plan.jsonl")] == ["big.png"]
    assert next(read_jsonl(tmp_path / "w" / "bucket" / "rejected.jsonl"))["path"] == "small.png"
    kept = bucket.run(bucket_cfg(tmp_path / "w", max_upscale=2.0, on_too_small="keep"))
    assert kept.counts["out"] == 2 and kept.extra["upscaled_beyond_limit"] == 1


def test_random_crop_is_seeded_and_recorded(tmp_path):
    w = ingested(tmp_path)
    bucket.run(bucket_cfg(w, crop="random", seed=1, max_area=256 * 256, min_side=128, max_side=512))
    first = (w / "bucket" / "plan.jsonl").read_bytes()
    bucket.run(bucket_cfg(w, crop="random", seed=1, max_area=256 * 256, min_side=128, max_side=512), force=True)
    assert (w / "bucket" / "plan.jsonl").read_bytes() == first
    bucket.run(bucket_cfg(w, crop="random", seed=2, max_area=256 * 256, min_side=128, max_side=512))
    assert (w / "bucket" / "plan.jsonl").read_bytes() != first


def test_bucket_refuses_missing_and_wrong_inputs(tmp_path, runner):
    result = runner.invoke(app, ["bucket", "--workdir", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no `ingest` output found; run: sdxl ingest" in result.stderr
    w = ingested(tmp_path)
    assert runner.invoke(app, ["bucket", "--workdir", str(w)]).exit_code == 0
    result = runner.invoke(app, ["bucket", "--in", str(w / "bucket"), "--out", str(tmp_path / "b2")])
    assert result.exit_code == 2 and "holds `bucket` output, expected `ingest` output" in result.stderr
    (w / "ingest" / "manifest.json").unlink()
    result = runner.invoke(app, ["bucket", "--workdir", str(w)])
    assert result.exit_code == 2 and "not a finished `ingest` output" in result.stderr
    assert "Traceback" not in result.output
