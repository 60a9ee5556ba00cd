"""The train checkpoint format (shared/formats/checkpoints.py): the manifest record and the LoRA spec round trip,
every part's state round trips through safetensors + JSON (no pickle), the folder protocol (partial, manifest
last, rename, keep K), another version is refused in one line naming it and the command that rewrites it, and
damage is found."""
import json

import pytest
import torch

from shared.core.errors import InputError
from shared.formats import checkpoints as C
from shared.models.lora import LoraSpec

SPEC = LoraSpec("attn+conv", 4, 2.0, 0.1, True)


def record(step: int = 7, lora: LoraSpec | None = SPEC) -> C.CheckpointManifest:
    return C.CheckpointManifest(step=step, epoch=1, method="lora" if lora else "full", lora=lora,
                                model="builtin:tiny", weights_dtype="float32", config={"learning_rate": 0.003},
                                inputs={"encode": "abc"}, fingerprint="fp", created="2025-01-01T00:00:00+00:00")


def finished(folder, rec: C.CheckpointManifest | None = None):
    folder.mkdir(parents=True)
    C.write_state(folder, "weights", {"unet.a": torch.ones(2, 3)}, {"format": "sdxl-stages"})
    C.write_manifest(folder, rec or record())
    return folder


def test_lora_spec_round_trips_one_way():
    assert LoraSpec.from_dict(SPEC.to_dict()) == SPEC and LoraSpec.from_json(SPEC.to_json()) == SPEC
    assert json.loads(SPEC.to_json()) == SPEC.to_dict()  # the safetensors metadata holds the manifest's dict
    with pytest.raises(ValueError, match="keys"):
        LoraSpec.from_dict({"preset": "attn", "rank": 4})
    with pytest.raises(ValueError, match="rank"):
        LoraSpec.from_dict({**SPEC.to_dict(), "rank": "4"})


@pytest.mark.parametrize("lora", [SPEC, None], ids=["lora", "full"])
def test_manifest_record_round_trips(tmp_path, lora):
    rec = record(lora=lora)
    assert C.CheckpointManifest.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    folder = finished(tmp_path / "step-000007", rec)
    back = C.read_manifest(folder)
    assert back.files.keys() == {"weights.safetensors"}
    assert back == C.CheckpointManifest(**{**rec.__dict__, "files": back.files})
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["stage"] == "train-checkpoint" and raw["version"] == C.VERSION
    assert raw["lora"] == (lora.to_dict() if lora else None)
    assert C.is_checkpoint(folder) and not C.is_checkpoint(tmp_path)


def test_part_states_round_trip_without_pickle(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.8, 0.9))
    p.grad = torch.randn(3, 2)
    opt.step()
    scaler = torch.amp.GradScaler("cpu")
    parts = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "disabled": {},
             "rng": {"torch": torch.get_rng_state(), "python": (3, tuple(range(5)), None), "mixed": {0: [1.5, "x"]}}}
    for name, state in parts.items():
        C.write_state(tmp_path, name, state)
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "disabled.json", "optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors", "scaler.json"]
    back = C.read_state(tmp_path, "optimizer")
    assert back["param_groups"][0]["betas"] == (0.8, 0.9) and list(back["state"]) == [0]
    assert all(torch.equal(back["state"][0][k], v) for k, v in opt.state_dict()["state"][0].items())
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1.0)
    fresh.load_state_dict(back)  # int keys and tuples as torch wrote them
    assert fresh.param_groups[0]["lr"] == 1e-3 and torch.equal(fresh.state_dict()["state"][0]["exp_avg"],
                                                                opt.state_dict()["state"][0]["exp_avg"])
    assert C.read_state(tmp_path, "scaler") == scaler.state_dict() and C.read_state(tmp_path, "disabled") == {}
    rng = C.read_state(tmp_path, "rng")
    assert torch.equal(rng["torch"], parts["rng"]["torch"]) and rng["python"] == (3, (0, 1, 2, 3, 4), None)
    assert rng["mixed"] == {0: [1.5, "x"]}
    assert C.read_state(tmp_path, "absent") is None
    with pytest.raises(TypeError, match="cannot store"):
        C.write_state(tmp_path, "bad", {"x": object()})


def test_flat_weights_are_one_safetensors_file_with_metadata(tmp_path):
    from safetensors import safe_open

    C.write_state(tmp_path, "weights", {"unet.b": torch.zeros(2), "unet.a": torch.ones(1)}, {"lora": SPEC.to_json()})
    assert [f.name for f in tmp_path.iterdir()] == ["weights.safetensors"]
    with safe_open(str(tmp_path / "weights.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["unet.a", "unet.b"]
        assert LoraSpec.from_json(f.metadata()["lora"]) == SPEC
    assert set(C.read_state(tmp_path, "weights")) == {"unet.a", "unet.b"}


def test_folder_protocol_partial_manifest_last_rename_keep(tmp_path):
    root = tmp_path / "checkpoints"

    def files(folder):
        assert folder.name.endswith(".partial") and (folder / "rank0.json").is_file()  # ranks' files came first
        assert not (folder / "manifest.json").exists()
        C.write_state(folder, "weights", {"unet.a": torch.ones(1)})

    for step in (2, 4, 6):
        C.write(root, record(step), files, keep=2, each_rank=lambda d: C.write_state(d, "rank0", {"n": 1}))
    assert [p.name for p in C.complete(root)] == ["step-000004", "step-000006"]
    assert C.read_manifest(root / "step-000006").files.keys() == {"weights.safetensors", "rank0.json"}

    def crash(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.write(root, record(8), crash, keep=2)
    assert (root / "step-000008.partial").is_dir()
    assert [p.name for p in C.complete(root)] == ["step-000004", "step-000006"]  # a partial is never finished
    # a stop while an old checkpoint was deleted: renamed out of the pattern first, so never a partial step-N;
    # the next write finishes the deletion
    (root / "step-000004").replace(root / ("step-000004" + C.REMOVING))
    (root / ("step-000004" + C.REMOVING) / "weights.safetensors").unlink()
    assert [p.name for p in C.complete(root)] == ["step-000006"]
    C.write(root, record(10), files, keep=2, each_rank=lambda d: C.write_state(d, "rank0", {"n": 1}))
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000008.partial", "step-000010"]


def test_another_version_is_refused_naming_it_and_the_rewrite(tmp_path):
    folder = finished(tmp_path / "step-000007")
    raw = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**raw, "version": 2}))
    with pytest.raises(InputError) as e:
        C.read_manifest(folder)
    text = str(e.value)
    assert "format version 2" in text and f"reads {C.VERSION}" in text and "sdxl train" in text
    assert "\n" not in text
    assert C.damage(folder) == [text]  # not resumable either
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "method"}))
    with pytest.raises(InputError, match="lacks method.*sdxl train"):
        C.read_manifest(folder)


def test_damage_is_found_and_named(tmp_path):
    folder = finished(tmp_path / "step-000007")
    assert C.damage(folder) == [] and C.require_intact(folder).step == 7
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "weights.safetensors").write_bytes(bytes(data))
    assert C.damage(folder) == ["weights.safetensors differs from what was written (size or sha256)"]
    with pytest.raises(InputError, match=r"step-000007: damaged checkpoint \(weights.safetensors differs"):
        C.require_intact(folder)
    (folder / "weights.safetensors").unlink()
    assert C.damage(folder) == ["weights.safetensors is missing"]


def test_a_key_an_older_checkpoint_lacks_differs_only_when_set_off_its_default():
    """A checkpoint written before a config key existed resumes with that key at its default (the value that
    trains as before) and is refused, naming the key, with any other value."""
    from stages import train
    from stages.train import checkpoint as ckpt

    defaults = ckpt.config_defaults(train.Config)
    assert defaults["train_text_encoder"] == "none" and defaults["target"] == "unet" and "output" not in defaults
    saved = record(3)   # its config records learning_rate only
    now = {**defaults, "learning_rate": 0.003}
    assert ckpt.differences(saved, now, {"encode": "abc"}, defaults=defaults) == []
    changed = {**now, "train_text_encoder": "te1"}
    assert ckpt.differences(saved, changed, {"encode": "abc"}, defaults=defaults) == ['train_text_encoder null -> "te1"']
    assert ckpt.differences(saved, now, {"encode": "abc"})   # without the defaults: every new key differs
