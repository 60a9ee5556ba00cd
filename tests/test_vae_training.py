"""Issue 15: the VAE as a training target on builtin:tiny. encode stores the planned crops' pixels (lossless PNG
/ WebP members, a uint8 zarr array); `train --target vae` fine-tunes the decoder (or encoder and decoder) with a
reconstruction + perceptual (+ KL) loss, resumes bitwise after kill -9, validates PSNR and perceptual distance
before vs after with a grid; export writes a diffusers AutoencoderKL folder and an original-layout single file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.core.config import resolve
from shared.formats import samples as fmt
from shared.formats import shards
from tests.conftest import caption, encode_folder, save


def smooth_image(size: int, seed: int) -> Image.Image:
    """A smooth random colour field (what a VAE can learn to reconstruct in a few steps, unlike noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8), "RGB")
    return small.resize((size, size), Image.BICUBIC)


def encode_pixels(root: Path, pixels: str = "png", fmt_: str = "both") -> Path:
    """8 captioned 96x96 images -> one 64x64 bucket, 2 shards of 4, with the crops' pixels stored."""
    for i in range(8):
        p = save(smooth_image(96, 10 + i), root / "src" / f"img_{i:02d}.png")
        caption(p, f"colour {i % 4}, common")
    return encode_folder(root, max_area=64 * 64, max_side=64, shard_samples=4, format=fmt_, pixels=pixels)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    return encode_pixels(tmp_path_factory.mktemp("vae"))


def test_only_the_vae_target_decodes_the_stored_images(encoded):
    """The UNet target reads shards with images without decoding them (~20 ms a 1024² PNG); the VAE target gets
    them as uint8 arrays; from the zarr store both get the rows (their digest covers every array)."""
    from stages import train
    from stages.train import feed

    def first(**kw):
        data = feed.open_data(train.Config(model="builtin:tiny", workdir=encoded, perceptual_weight=0.0, **kw).data)
        return data.read.load(0)[0]

    assert first().pixels is None and first(target="vae").pixels.dtype == np.uint8
    assert first(source="zarr").pixels is not None


def test_encode_stores_the_planned_crop_losslessly_in_tar_and_zarr(encoded, tmp_path):
    """Each sample's pixels are exactly the planned crop (what its latent was encoded from), in the tar as a
    PNG member and in the zarr store as uint8 rows; the layout records it; webp is lossless too."""
    from shared.formats.plan import read_plan
    from shared.images import load_planned

    index = json.loads((encoded / "encode" / "index.json").read_text())
    assert index["pixels"] == "png" and index["version"] == fmt.ENCODE_VERSION == 6
    plan = {r.id: r for r in read_plan(encoded / "bucket")}
    tars = sorted((encoded / "encode" / "shards").rglob("*.tar"))
    raw = [r for t in tars for r in shards.read_tar(t)]
    assert len(raw) == 8 and all("pixels.png" in r for r in raw)
    store = shards.open_store(encoded / "encode" / "zarr", mode="r")
    rows, keys = fmt.read_rows(store["64x64"], 0, 8)
    for r in raw:
        row = plan[r["__key__"]]
        want = load_planned(row.image, row.resize, row.crop, row.bucket)
        got = fmt.from_tar({**r, "json": json.dumps(r["json"]).encode()}, "t", "fix").pixels
        assert got.dtype == np.uint8 and np.array_equal(got, want)
        assert np.array_equal(rows["pixels"][keys.index(r["__key__"])], want)
    webp = fmt.image_array(fmt.image_bytes(want, "webp"), "w", "fix")
    assert np.array_equal(webp, want)


# ---------------------------------------------------------------- train --target vae

VAE = {"model": "builtin:tiny", "target": "vae", "vae_train": "encoder+decoder", "kl_weight": 1e-4,
       "perceptual_layers": "1,1,0,0,0", "batch_size": 2, "shuffle_buffer": 4, "max_steps": 6,
       "checkpoint_every": 3, "learning_rate": 2e-3, "eval_samples": 2, "holdout_count": 2, "ema_decay": 0.9}


def vgg_file(folder: Path) -> Path:
    """Random-init VGG16 trunk weights as a torchvision-named safetensors file (tests never download)."""
    from safetensors.torch import save_file

    from stages.train import perceptual as P

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = P.Perceptual().state_dict()
    path = folder / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("features.")}, str(path))
    return path


@pytest.fixture(scope="module")
def trained(encoded, tmp_path_factory):
    """One VAE run (encoder+decoder, KL, perceptual on two VGG layers, EMA, 2 held-out items), in this process on
    one thread, as the CLI runs it in the kill -9 test (the same math, bit for bit)."""
    from stages import train

    folder = tmp_path_factory.mktemp("vae-train")
    vgg = vgg_file(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = train.run(resolve(train.Config, "train", {}, {"workdir": encoded, "output": folder / "a",
                                                         "perceptual_weights": vgg, **VAE}))
    finally:
        torch.set_num_threads(threads)
    return folder, m


def test_vae_training_lowers_the_loss_and_validates_before_vs_after(encoded, trained):
    """A few steps lower the reconstruction loss on the fixed samples and raise their PSNR; the held-out items'
    PSNR and perceptual distance before (the base VAE, step 0) and after are in the manifest and metrics.jsonl;
    checkpoints hold the whole VAE under `vae.` (and its EMA); the grid shows original | base | fine-tuned."""
    folder, m = trained
    history = m.extra["eval_loss"]["history"]
    assert [h[0] for h in history] == [0, 3, 6]
    assert history[-1][1] < 0.95 * history[0][1] and history[-1][2] > history[0][2], history
    summary = m.extra["vae"]
    assert set(summary["val"]) == {"loss", "psnr", "perceptual"} and summary["vae_train"] == "encoder+decoder"
    assert summary["val"]["psnr"]["before"] == m.extra["val_loss"]["history"][0][2]
    rows = [json.loads(line) for line in (folder / "a" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_psnr" in r] == [0, 3, 6]
    trained = [r for r in rows if "loss" in r]
    assert trained and not any(k.startswith("loss_t") for r in trained for k in r)  # no timesteps to bin by
    final = folder / "a" / "checkpoints" / "step-000006"
    man = json.loads((final / "manifest.json").read_text())
    assert man["method"] == "vae" and man["lora"] is None and man["config"]["target"] == "vae"
    from safetensors.torch import load_file

    from shared.models import loading as models

    weights, base = load_file(str(final / "weights.safetensors")), models.load_model("builtin:tiny", ("vae",)).vae
    assert set(weights) == {"vae." + k for k in base.state_dict()}
    assert not torch.equal(weights["vae.encoder.conv_in.weight"], base.state_dict()["encoder.conv_in.weight"])
    assert (final / "ema.safetensors").is_file()
    grid = np.asarray(Image.open(folder / "a" / "samples" / "vae-grid.png"))
    assert grid.shape == (2 + 2 * 66, 2 + 3 * 66, 3)
    held = json.loads((folder / "a" / "holdout.json").read_text())["ids"]
    store = shards.open_store(encoded / "encode" / "zarr", mode="r")
    rows_, keys = fmt.read_rows(store["64x64"], 0, 8, ["pixels"])
    originals = [rows_["pixels"][keys.index(k)] for k in held]
    assert any(np.array_equal(grid[2:66, 2:66], o) for o in originals)   # column 1: an original crop
    assert not np.array_equal(grid[2:66, 68:132], grid[2:66, 134:198])   # base and fine-tuned differ


def test_vae_target_options_are_checked(encoded, tmp_path):
    """The perceptual loss without its weights file, KL on a frozen encoder, a UNet-only option, shards without
    pixels: each one line. The decoder-only target trains the decoder's parameters alone."""
    from shared.core.errors import ConfigError, InputError
    from stages import train
    from stages.train import vae as V
    from stages.train.step import Precision

    def cfg(**kw):
        return resolve(train.Config, "train", {}, {"workdir": encoded, **{**VAE, **kw}})

    with pytest.raises(ConfigError, match="perceptual_weight 1 needs the perceptual network's weights"):
        cfg(perceptual_layers="1,1,1,1,1")
    with pytest.raises(ConfigError, match="perceptual_layers '1,1,x,0,0': expected 5 numbers"):
        cfg(perceptual_weight=0.0, perceptual_layers="1,1,x,0,0")
    with pytest.raises(ConfigError, match="kl_weight acts on the encoder"):
        cfg(perceptual_weight=0.0, vae_train="decoder")
    with pytest.raises(ConfigError, match="quantize_base applies to the UNet target"):
        cfg(perceptual_weight=0.0, quantize_base="fp8")
    with pytest.raises(ConfigError, match="train_text_encoder applies to the UNet target"):
        cfg(perceptual_weight=0.0, train_text_encoder="te1")
    from shared.formats.samples import Layout

    with pytest.raises(InputError, match="encode with --pixels png"):
        V.VaeTraining.check_data(Layout("float16", 4, 0.13, 8, 8, 1, 1, False, False), "enc")
    assert cfg(perceptual_weight=0.0, vae_lr=1e-5).optim.group_lr("vae") == 1e-5
    assert cfg(perceptual_weight=0.0).optim.group_lr("vae") == VAE["learning_rate"]
    decoder = V.VaeTraining(cfg(perceptual_weight=0.0, kl_weight=0.0, vae_train="decoder").vae_target,
                            torch.device("cpu"), Precision.make("float32", "no", "cpu"))
    names = {n for n, p in decoder.vae.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("decoder.", "post_quant_conv.")) for n in names)
    assert {id(p) for p in decoder.groups()["vae"]} == {id(p) for n, p in decoder.vae.named_parameters()
                                                        if n in names}


def test_kill_9_then_resume_equals_the_uninterrupted_vae_run(encoded, trained, tmp_path):
    """Kill -9 after step 4 (checkpoint at 3), rerun: the VAE's weights, EMA, optimizer, schedule, progress and
    RNG state at step 6 are bitwise those of the uninterrupted run."""
    from tests.test_train import same_tensors, sdxl

    folder, _ = trained
    opts = {**VAE, "perceptual_weights": folder / "vgg16.safetensors"}
    args = ["train", "--workdir", str(encoded), "--out", str(tmp_path / "b")]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    killed = sdxl(args, env={"SDXL_FAULT": "train.step:4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = sdxl(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout and "step 3 of 6" in again.stdout
    a, b = folder / "a" / "checkpoints" / "step-000006", tmp_path / "b" / "checkpoints" / "step-000006"
    for name in ("weights", "ema", "optimizer", "rng-rank0"):
        assert same_tensors(a / f"{name}.safetensors", b / f"{name}.safetensors"), name
    for name in ("optimizer", "scheduler", "progress"):
        assert json.loads((a / f"{name}.json").read_text()) == json.loads((b / f"{name}.json").read_text()), name


def test_export_writes_a_diffusers_vae_and_an_original_layout_file_that_encode_can_use(encoded, trained, tmp_path):
    """export of a VAE run: a diffusers AutoencoderKL folder (from_pretrained gives the trained weights) and one
    original-layout file (from_single_file, offline, gives them too), both verified; encode --vae on the folder
    changes encode's model fingerprint (so `sdxl run` re-encodes)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from stages import encode, export
    from stages.export import vae as vae_export
    from stages.export.formats import FORMATS

    folder, _ = trained
    m = export.run(resolve(export.Config, "export", {}, {"input": folder / "a", "output": tmp_path / "x",
                                                        "dtype": "float32", "device": "cpu"}))
    assert set(m.extra["formats"]) == {"diffusers", "single-file"} and m.extra["method"] == "vae"
    assert all(r["verified"] and r["max_abs_diff"] < 1e-5 for r in m.extra["formats"].values())
    trained_state = {k[4:]: v for k, v in load_file(str(folder / "a" / "checkpoints" / "step-000006" /
                                                        "weights.safetensors")).items()}
    loaded = AutoencoderKL.from_pretrained(str(tmp_path / "x" / "vae")).state_dict()
    assert loaded.keys() == trained_state.keys() and all(torch.equal(loaded[k], trained_state[k]) for k in loaded)
    single = load_file(str(tmp_path / "x" / "sdxl.vae.safetensors"))
    assert "decoder.conv_in.weight" in single and "post_quant_conv.weight" in single
    assert not any(k.startswith("first_stage_model.") for k in single)
    back = FORMATS["single-file"].vae.load(tmp_path / "x" / "sdxl.vae.safetensors",
                                           tmp_path / "x" / vae_export.CONFIG)
    assert all(torch.equal(back.state_dict()[k], trained_state[k]) for k in trained_state)

    def fingerprint(**kw):
        cfg = resolve(encode.Config, "encode", {}, {"workdir": encoded, "model": "builtin:tiny", **kw})
        return encode.STAGE.inputs(cfg)["model"]["fingerprint"]

    assert fingerprint(vae=str(tmp_path / "x" / "vae")) != fingerprint()
