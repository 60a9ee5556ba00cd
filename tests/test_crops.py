"""Issue 13's last parts on builtin:tiny: encode's crops_per_item (K crops per item, crop 0 the planned one) and
train's per-epoch crop choice; the held-out set chosen from index.json's item ids without reading every shard;
WandB scalars and sample images (through a fake `wandb` module: the package is optional)."""
import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.core.config import resolve
from shared.core.errors import ConfigError
from shared.formats.samples import Sample
from stages import bucket, encode, ingest, train
from stages.encode import reuse
from stages.train import feed, holdout as H, logs, loop, step as S
from stages.train.targets import UnetTarget
from stages.train.feed import DataConfig
from stages.train.objective import ObjectiveConfig
from tests.conftest import caption, noise_image, save

K = 3
ENCODE = {"model": "builtin:tiny", "shard_samples": 2, "format": "both", "flip": True, "workers": 0,
          "decoder": "pil", "batch_size": 4}


def _encode(work: Path, out: str, **kw) -> Path:
    encode.run(resolve(encode.Config, "encode", {}, {"workdir": work, "output": work / out, **ENCODE, **kw}))
    return work / out


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """8 images of aspect 1.6 (either way) -> one 128x128 bucket with spare width or height to crop from,
    encoded with 1 crop, with 3 crops, and with 3 crops again."""
    root = tmp_path_factory.mktemp("crops")
    for i in range(8):
        w, h = (256, 160) if i % 2 else (160, 256)
        caption(save(noise_image(w, h, seed=300 + i), root / "src" / f"img_{i}.png"), f"thing {i % 3}, common")
    work = root / "w"
    ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(root / "src"),), "workdir": work,
                                                    "workers": 1, "min_side": 64}))
    bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, "max_area": 128 * 128, "min_side": 64,
                                                    "max_side": 256}))
    return {"one": _encode(work, "one"), "three": _encode(work, "three", crops_per_item=K),
            "again": _encode(work, "again", crops_per_item=K)}


def _samples(folder: Path, source: str = "wds") -> dict[str, Sample]:
    data = feed.open_data(DataConfig(input=folder, shards=(), source=source, batch_size=2, accumulate=1,
                                          shuffle_buffer=4, epochs=1, max_steps=0, seed=0, prefetch=2))
    return {s.key: s for info in data.infos for _, s in data.read(info.number)}


def test_encode_stores_k_crops_crop_0_the_planned_one_deterministically(encoded):
    one, three = _samples(encoded["one"]), _samples(encoded["three"])
    index = json.loads((encoded["three"] / "index.json").read_text())
    assert index["crops"] == K and json.loads((encoded["one"] / "index.json").read_text())["crops"] == 1
    assert one.keys() == three.keys()
    for key, s in three.items():
        assert s.crops == K and one[key].crops == 1 and one[key].latent_crops is None
        assert s.latent_crops.shape == (K - 1,) + s.latent.shape == s.latent_flip_crops.shape
        assert np.array_equal(s.latent, one[key].latent) and np.array_equal(s.latent_flip, one[key].latent_flip)
        assert s.time_ids == one[key].time_ids
        tops_lefts = {s.time_ids[2:4]} | {t[2:4] for t in s.time_ids_crops}
        lats = [s.latent] + list(s.latent_crops)
        distinct = len({a.tobytes() for a in lats})
        assert distinct == len(tops_lefts)  # a crop at another place is another latent
        assert all(t[:2] == s.time_ids[:2] and t[4:] == s.time_ids[4:] for t in s.time_ids_crops)
    assert sum(len({s.time_ids[2:4]} | {t[2:4] for t in s.time_ids_crops}) for s in three.values()) > len(three)
    zarr = _samples(encoded["three"], "zarr")  # the zarr rows hold the same crops
    for key, s in three.items():
        assert np.array_equal(zarr[key].latent_flip_crops, s.latent_flip_crops)
        assert zarr[key].time_ids_crops == s.time_ids_crops and zarr[key].time_ids_flip_crops == s.time_ids_flip_crops
    shas = [s["sha256"] for b in index["buckets"] for s in b["shards"]]
    again = json.loads((encoded["again"] / "index.json").read_text())
    assert [s["sha256"] for b in again["buckets"] for s in b["shards"]] == shas  # deterministic
    work = encoded["again"].parent  # a rerun takes every sample, crops and all, from there: the same bytes
    m = encode.run(resolve(encode.Config, "encode", {}, {"workdir": work, "output": work / "again", **ENCODE,
                                                         "crops_per_item": K}), force=True)
    again = json.loads((encoded["again"] / "index.json").read_text())
    assert m.extra["reused"] == len(three) and [s["sha256"] for b in again["buckets"] for s in b["shards"]] == shas


def test_crops_per_item_is_a_shaping_option_of_incremental_encode(tmp_path):
    def key(**kw):
        cfg = resolve(encode.Config, "encode", {}, {"workdir": tmp_path, "model": "builtin:tiny", **kw})
        return reuse.run_key(cfg, {"model": {"fingerprint": "m"}}, "code", {})
    assert key(crops_per_item=3) != key() == key(crops_per_item=1)
    with pytest.raises(ConfigError):
        key(crops_per_item=0)


def _objective(**kw) -> ObjectiveConfig:
    base = dict(prediction="epsilon", schedule="sdxl", timesteps="uniform", logit_mean=0.0, logit_std=1.0,
                flow_shift=1.0, min_snr_gamma=0.0, noise_offset=0.0, tag_weighting=False, caption_dropout=0.0,
                flip_rate=0.0, seed=7)
    return ObjectiveConfig(**{**base, **kw})


def _toy(key: str, crops: int = K) -> Sample:
    """A sample whose crop k's latent is all k (its mirror image's all -k) and time ids name the crop."""
    lat = [np.full((4, 2, 2), float(k), np.float16) for k in range(crops)]
    return Sample(key=key, latent=lat[0], latent_flip=-lat[0], te=np.zeros((1, 77, 8), np.float16), windows=(1,),
                  pooled=np.zeros((1, 6), np.float16), time_ids=(0.0,) * 6, time_ids_flip=(0.5,) * 6,
                  latent_crops=np.stack(lat[1:]) if crops > 1 else None,
                  latent_flip_crops=-np.stack(lat[1:]) if crops > 1 else None,
                  time_ids_crops=tuple((float(k),) * 6 for k in range(1, crops)),
                  time_ids_flip_crops=tuple((k + 0.5,) * 6 for k in range(1, crops)))


def test_assemble_takes_one_crop_per_sample_per_epoch_and_every_crop_once_per_cycle():
    from shared.formats.samples import EmptyCaption

    empty = EmptyCaption(np.zeros((77, 8), np.float16), np.zeros(6, np.float16), np.zeros((2, 77), np.int32))
    keys = [f"item{i}" for i in range(6)]
    for flip in (0.0, 1.0):
        cfg = _objective(flip_rate=flip)
        sign = -1 if flip else 1
        chosen = {}
        for epoch in range(2 * K):
            for step, micro in ((epoch * 10, 0), (epoch * 10 + 3, 1)):  # two uses of each sample in the epoch
                batch = S.assemble([_toy(k) for k in keys], step, micro, empty, cfg, epoch)
                crop = [int(round(float(x))) * sign for x in batch.latents[:, 0, 0, 0]]
                assert [int(t) for t in batch.time_ids[:, 0]] == crop  # the crop's own time ids
                assert all(float(t) % 1 == flip / 2 for t in batch.time_ids[:, 0])
                assert chosen.setdefault(epoch, crop) == crop  # the same crop all epoch long
        for i in range(len(keys)):
            for cycle in range(2):
                assert sorted(chosen[e][i] for e in range(cycle * K, cycle * K + K)) == list(range(K))
        assert any(len(set(c)) > 1 for c in chosen.values())  # samples do not move in lockstep
    plain = S.assemble([_toy("a", 1)], 0, 0, empty, _objective(), 5)
    assert float(plain.latents.abs().max()) == 0.0  # one crop: always it


class _Interrupted(Exception):
    pass


class _Identity(torch.nn.Module):
    """A stand-in UNet whose prediction is its input (the loss then depends on the latent it was given)."""

    def forward(self, x, timestep, encoder_hidden_states=None, added_cond_kwargs=None):
        return types.SimpleNamespace(sample=x)


def test_evaluation_uses_crop_0():
    s = _toy("held")
    no_crops = dataclasses.replace(s, latent_crops=None, latent_flip_crops=None, time_ids_crops=(),
                                   time_ids_flip_crops=())
    crop_1 = dataclasses.replace(no_crops, latent=s.latent_crops[0])
    from stages.train import objective

    args = (_objective(), objective.schedule("sdxl").float(), S.Precision.make("float32", "no", "cpu"),
            torch.device("cpu"))
    each = [S.evaluate_each(_Identity(), [x], *args) for x in (s, no_crops, crop_1)]
    assert torch.equal(each[0], each[1]) and not torch.equal(each[0], each[2])


def test_training_takes_the_epochs_crop_and_holdout_reads_no_shard_to_choose(encoded, tmp_path, monkeypatch):
    """A run of 3 epochs on the 3-crop encode: every batch holds each sample at the crop of its epoch (all 3 over
    the run); the held-out items come from index.json (no shard opened to choose them; only the shards holding
    them read) and equal a scan of every shard."""
    from stages.train.reader import ShardReader

    seen: list[tuple[int, str, bytes, int]] = []
    real = S.assemble

    def spy(samples, step, micro, empty, cfg, epoch=0, **kw):
        batch = real(samples, step, micro, empty, cfg, epoch, **kw)
        for s, lat in zip(samples, batch.latents):
            seen.append((epoch, s.key, lat.numpy().astype(np.float16).tobytes(), step))
        return batch
    monkeypatch.setattr(S, "assemble", spy)
    loads: list[int] = []
    real_load = ShardReader.load
    monkeypatch.setattr(ShardReader, "load", lambda self, n: loads.append(n) or real_load(self, n))
    folder = encoded["three"]
    data = feed.open_data(DataConfig(input=folder, shards=(), source="wds", batch_size=2, accumulate=1,
                                          shuffle_buffer=4, epochs=1, max_steps=0, seed=0, prefetch=2))
    cfg = H.HoldoutConfig(holdout=0.0, holdout_count=2, item_losses=False)
    chosen = H.from_index(data.infos, cfg)
    assert loads == []
    every = [(s.key, info.number, j) for info in data.infos for j, s in data.read(info.number)]
    held = H.choose([k for k, *_ in every], 0.0, 2)
    assert chosen.ids == sorted(held)
    assert sorted(chosen.refs) == sorted((n, j) for k, n, j in every if k in held)
    loads.clear()
    during: list[list[int]] = []
    prepare = H.prepare

    def counted(*args, **kw):
        before = len(loads)
        try:
            return prepare(*args, **kw)
        finally:
            during.append(loads[before:])
    monkeypatch.setattr(H, "prepare", counted)

    def run(out: str):
        return train.run(resolve(train.Config, "train", {}, {
            "input": folder, "workdir": tmp_path, "output": tmp_path / out, "model": "builtin:tiny", "batch_size": 2,
            "shuffle_buffer": 4, "epochs": K, "checkpoint_every": 4, "eval_samples": 1, "lora_rank": 4,
            "lora_alpha": 4.0, "flip_rate": 0.0, "holdout_count": 2, "seed": 11}))
    m = run("t")
    assert json.loads((tmp_path / "t" / "holdout.json").read_text())["ids"] == chosen.ids
    holding = sorted({n for n, _ in chosen.refs})
    assert [sorted(d) for d in during] == [holding] and len(holding) < len(data.infos)  # not a scan
    per_epoch = m.extra["steps_per_epoch"][0]
    samples = _samples(folder)
    used: dict[str, set[int]] = {}
    for epoch, key, lat, step in seen:
        assert epoch == step // per_epoch
        k = S.crop_index(11, epoch, key, K)
        assert samples[key].crop(k, False)[0].tobytes() == lat
        used.setdefault(key, set()).add(k)
    assert used and all(v == set(range(K)) for v in used.values()) and not set(used) & set(chosen.ids)

    whole, hits = list(seen), []   # interrupted after step 6, resumed from step 4: the same crops from there

    def fault(point):
        if point == "train.step" and len(hits.append(1) or hits) == 6:
            raise _Interrupted
    monkeypatch.setattr(loop, "fault_point", fault)
    with pytest.raises(_Interrupted):
        run("r")
    monkeypatch.setattr(loop, "fault_point", lambda point: None)
    seen.clear()
    run("r")
    assert seen and seen == [x for x in whole if x[3] >= 4]


# ---------------------------------------------------------------- WandB


class _FakeWandb(types.ModuleType):
    """Records what a run logs; `Image` keeps its path and caption."""

    def __init__(self):
        super().__init__("wandb")
        self.logged: list[tuple[dict, int]] = []
        self.inits: list[dict] = []
        self.finished = False
        fake = self

        class Image:
            def __init__(self, path, caption=None):
                self.path, self.caption = path, caption
        self.Image = Image

        class Run:
            def log(self, values, step=None):
                fake.logged.append((values, step))

            def finish(self):
                fake.finished = True
        self._run = Run()

    def init(self, **kw):
        self.inits.append(kw)
        return self._run


def _log_config(wandb: bool) -> logs.LogConfig:
    return logs.LogConfig(log_every=1, eval_samples=0, tensorboard=False, wandb=wandb, wandb_project="p",
                          item_losses=False)


def test_wandb_gets_scalars_evaluations_and_sample_images(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = logs.TrainLog(_log_config(True), tmp_path / "logs", 10, 0, 4, {"lr": 1})
    assert fake.inits == [{"project": "p", "dir": str(tmp_path / "logs"), "config": {"lr": 1}, "resume": "allow"}]
    log.write(2, {"loss": 0.5, "lr": 1e-4}, [0.25] + [None] * (logs.BINS - 1))
    log.evaluation(2, "val_loss", torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]]), [])
    log.measures(2, {"val_psnr": 12.5}, "vae")   # the VAE target's measurements

    grid = tmp_path / "samples" / "grid.png"
    previews = types.SimpleNamespace(due=lambda step, total: True, render=lambda *a: grid,
                                     labelled=lambda step: {"samples/00": (grid.parent / "00.png", "a cat"),
                                                            "samples/grid": (grid, "rows: steps")})
    target = types.SimpleNamespace(previews=previews, staging=tmp_path, module=None, text=None,
                                   precision=types.SimpleNamespace(autocast=None))
    UnetTarget.sample_images(target, 3, 10, None, log)
    log.close()
    (scalars, s1), (evals, s2), (measured, s4), (images, s3) = fake.logged
    assert (s1, s2, s4, s3) == (2, 2, 2, 3) and fake.finished
    assert measured == {"vae/val_psnr": 12.5}
    assert {"step": 2, "val_psnr": 12.5} in [json.loads(r) for r in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert scalars["loss"] == 0.5 and scalars["loss_t00"] == 0.25 and "step" not in scalars
    assert evals["eval/val_loss"] == pytest.approx(0.3)
    assert {k: (v.path, v.caption) for k, v in images.items()} == {
        "samples/00": (str(grid.parent / "00.png"), "a cat"), "samples/grid": (str(grid), "rows: steps")}


def test_wandb_asked_for_but_not_installed_is_a_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match="pip install wandb"):
        logs.TrainLog(_log_config(True), tmp_path / "logs", 10, 0, 4, {})
