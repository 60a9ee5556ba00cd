"""`sdxl generate`: DreamBooth class images from the base model — deterministic by seed, independent of the
batch size, resumable after kill -9, a no-op when rerun, and ingested as class images."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.core.config import resolve
from shared.core.errors import ConfigError
from shared.formats.jsonl import read_jsonl
from shared.models import sampling
from stages import generate, ingest

ROOT = Path(__file__).resolve().parents[1]
OPTS = {"model": "builtin:tiny", "prompt": "a photo of a dog", "count": 3, "width": 128, "height": 64,
        "steps": 3, "device": "cpu"}


def run(out: Path, **kw):
    return generate.run(resolve(generate.Config, "generate", {}, {**OPTS, "output": out, **kw}))


def pixels(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "classes"
    run(out, batch_size=2)
    return out


def test_images_and_captions(made, capsys):
    images = pixels(made)
    assert sorted(images) == ["000000.png", "000001.png", "000002.png"]
    assert all(a.shape == (64, 128, 3) for a in images.values())
    assert all((made / "images" / f"{i:06d}.txt").read_text() == "a photo of a dog\n" for i in range(3))
    assert not np.array_equal(images["000000.png"], images["000001.png"])  # each image its own seed
    again = run(made, batch_size=2)
    assert "unchanged, skipped" in capsys.readouterr().out and again.extra["objective"]["prediction"] == "epsilon"


def test_deterministic_by_seed_and_batch_size(made, tmp_path):
    run(tmp_path / "one", batch_size=1)  # the batch size is not fingerprinted: same images, within rounding
    a, b = pixels(made), pixels(tmp_path / "one")
    assert a.keys() == b.keys()
    assert max(int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a) <= 1
    run(tmp_path / "seeded", seed=1, count=1)
    assert not np.array_equal(pixels(tmp_path / "seeded")["000000.png"], a["000000.png"])
    # seed 1's first image is seed 0's second: image i is drawn from seed + i alone
    assert int(np.abs(pixels(tmp_path / "seeded")["000000.png"].astype(int) - a["000001.png"]).max()) <= 1


def test_killed_run_resumes_to_the_same_images(made, tmp_path, capsys):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "stages.cli", "generate", "--out", str(out), "--batch-size", "2",
            *(x for k, v in OPTS.items() for x in (f"--{k.replace('_', '-')}", str(v)))]
    env = {**os.environ, "SDXL_PROGRESS": "0"}
    killed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**env, "SDXL_FAULT": "generate.image:2"})
    assert killed.returncode == -9 and not out.exists()
    run(out, batch_size=2)
    assert "2 of 3 images already rendered" in capsys.readouterr().out
    for name, image in pixels(made).items():
        assert np.array_equal(pixels(out)[name], image), name


def test_the_images_are_ingested_as_class_images(made, tmp_path):
    cfg = resolve(ingest.Config, "ingest", {}, {"sources": ({"path": str(made / "images"), "role": "class"},),
                                                "output": tmp_path / "ingest", "workers": 1, "min_side": 64})
    ingest.run(cfg)
    rows = list(read_jsonl(tmp_path / "ingest" / "items.jsonl"))
    assert len(rows) == 3 and {r["role"] for r in rows} == {"class"} and rows[0]["caption"] == "a photo of a dog"


def test_bad_options_and_the_objective_of_a_scheduler_config():
    with pytest.raises(ConfigError, match="prompt: none given"):
        resolve(generate.Config, "generate", {}, {"model": "builtin:tiny"})
    with pytest.raises(ConfigError, match="width"):
        resolve(generate.Config, "generate", {}, {**OPTS, "width": 100})
    v = sampling.Objective.from_scheduler({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True})
    assert (v.prediction, v.schedule) == ("v_prediction", "ztsnr")
    assert sampling.Objective.from_scheduler({"prediction_type": "epsilon"}) == sampling.Objective()
