"""Seeing and steering a run (issue 13) on builtin:tiny: sample images and held-out validation that never change
the run and repeat exactly after a resume, LoRA files mid-run, per-epoch checkpoints, starting from a LoRA file,
extending a finished run."""
import json

import pytest
import torch

from stages.train import loop
from tests.test_train import encoded, run_train, same_tensors  # noqa: F401  (the module's encoded data)

PROMPTS = """
[[prompt]]
prompt = "colour 1, shape 2"
negative = "blurry"
seed = 3
width = 32
height = 48
steps = 2
cfg = 4.0

[[prompt]]
prompt = "common"
seed = 5
width = 32
height = 32
steps = 1
cfg = 1.0
"""


class Interrupted(Exception):
    pass


def _interrupt_at(monkeypatch, step: int) -> None:
    """Raise where `train.step` is reached the `step`-th time (as kill -9 there would, staging kept)."""
    hits = []

    def fault(point):
        if point == "train.step":
            hits.append(1)
            if len(hits) == step:
                raise Interrupted
    monkeypatch.setattr(loop, "fault_point", fault)


def test_samples_and_validation_watch_the_run_without_changing_it(encoded, tmp_path, monkeypatch):
    """Sample images (EMA weights) and a held-out set on one run: rendering draws nothing from the training's
    generators (same weights as without samples), held-out items never reach a batch, and after an interrupted
    run resumes, the images after its checkpoint and the validation losses are bitwise the same."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stages.train import step as S

    trained: list[str] = []
    real = S.assemble

    def spy(samples, *args, **kw):
        trained.extend(s.key for s in samples)
        return real(samples, *args, **kw)
    monkeypatch.setattr(S, "assemble", spy)
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(PROMPTS)
    opts = dict(max_steps=4, checkpoint_every=2, lora_dropout=0.1, ema_decay=0.9, holdout_count=3, item_losses=True)
    with_samples = dict(opts, sample_prompts=prompts, sample_every=0)  # at the start and the end
    m = run_train(encoded, tmp_path / "a", **with_samples)
    held = json.loads((tmp_path / "a" / "holdout.json").read_text())["ids"]
    assert len(held) == 3 and trained and not set(held) & set(trained)
    run_train(encoded, tmp_path / "b", **opts)
    a, b = tmp_path / "a" / "checkpoints" / "step-000004", tmp_path / "b" / "checkpoints" / "step-000004"
    for name in ("weights", "ema", "rng-rank0"):  # rendering drew nothing from the training's generators
        assert same_tensors(a / f"{name}.safetensors", b / f"{name}.safetensors"), name

    samples = tmp_path / "a" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["grid.png", "step-000000", "step-000004"]
    assert (samples / "step-000004" / "weights.txt").read_text() == "ema\n"
    assert Image.open(samples / "step-000004" / "00.png").size == (32, 48)
    assert Image.open(samples / "grid.png").size == (160 + 2 * 32, 28 + 2 * 48)
    first, last = (Image.open(samples / f"step-00000{s}" / "00.png").tobytes() for s in (0, 4))
    assert first != last  # the model changed between them, and the samples show it
    lines = [json.loads(x) for x in (tmp_path / "a" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "samples" in x] == [0, 4]
    events = EventAccumulator(str(tmp_path / "a" / "logs" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"samples/00", "samples/01"}
    assert [e.step for e in events.Images("samples/00")] == [0, 4]

    vals = m.extra["val_loss"]["history"]
    assert [v[0] for v in vals] == [0, 2, 4] and m.extra["val_loss"]["items"] == 3
    val_lines = [x for x in lines if "val_loss" in x]
    assert [x["step"] for x in val_lines] == [0, 2, 4] and {"val_loss_t10", "val_loss_t90"} <= set(val_lines[0])
    assert [x["step"] for x in lines if "eval_loss" in x] == [0, 2, 4]
    items = [json.loads(x) for x in (tmp_path / "a" / "logs" / "item_losses.jsonl").read_text().splitlines()]
    assert {i["id"] for i in items if i["set"] == "val_loss"} == set(held) and all("caption" in i for i in items)

    _interrupt_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        run_train(encoded, tmp_path / "c", **with_samples)
    monkeypatch.setattr(loop, "fault_point", lambda point: None)
    resumed = run_train(encoded, tmp_path / "c", **with_samples)
    c = tmp_path / "c"
    assert same_tensors(a / "weights.safetensors", c / "checkpoints" / "step-000004" / "weights.safetensors")
    for step in ("step-000000", "step-000004"):  # step 4 rendered after the resume from step 2
        for i in ("00", "01"):
            assert (samples / step / f"{i}.png").read_bytes() == (c / "samples" / step / f"{i}.png").read_bytes()
    assert resumed.extra["val_loss"]["history"] == vals  # bitwise the same numbers
    assert json.loads((c / "holdout.json").read_text())["ids"] == held


def test_bad_prompt_files_are_one_line_errors(tmp_path):
    from shared.core.errors import ConfigError
    from stages.train.previews import load_prompts

    bad = tmp_path / "p.toml"
    for text, message in [("[[prompt]]\nprompt = 'x'\nwidth = 60\n", "multiples of 8"),
                          ("[[prompt]]\nprompt = 'x'\nsize = 64\n", "unknown: size"),
                          ("[[prompt]]\nprompt = 'x'\ncfg = nan\n", "finite"),
                          ("prompt = 'x'\n", "[[prompt]] tables"),
                          ("[[prompt\n", "not a readable TOML")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_prompts(bad)
    bad.write_text("[[prompt]]\nprompt = 'x'\n")
    assert load_prompts(bad)[0].steps == 20


def test_holdout_choice_is_by_item_hash_and_stable_when_items_are_added():
    from stages.train.holdout import choose, score

    old = [f"item-{i:04d}" for i in range(400)]
    new = old + [f"added-{i:04d}" for i in range(400)]
    held_old, held_new = choose(old, 0.1, 0), choose(new, 0.1, 0)
    assert held_new & set(old) == held_old          # adding items moved none in or out
    assert 20 < len(held_old) < 60                   # ~10 %
    five = choose(old, 0, 5)
    assert len(five) == 5 and max(map(score, five)) < min(score(k) for k in set(old) - five)


def test_lora_files_beside_checkpoints_match_what_export_writes(encoded, tmp_path):
    from safetensors import safe_open

    from stages import export

    out = tmp_path / "t"
    trained = run_train(encoded, out, max_steps=4, checkpoint_every=2, ema_decay=0.9, lora_files=True, log_every=1)
    assert sorted(p.name for p in (out / "loras").iterdir()) == [
        "t-step-000002-ema.safetensors", "t-step-000002.safetensors", "t-step-000004-ema.safetensors",
        "t-step-000004.safetensors"]
    m = export.run(export.Config(input=out, output=tmp_path / "e", format=("kohya",), verify=False, device="cpu"))
    exported = tmp_path / "e" / m.extra["formats"]["kohya"]["file"]
    with safe_open(str(out / "loras" / "t-step-000004.safetensors"), "pt") as a, safe_open(str(exported), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        ma, mb = a.metadata(), b.metadata()
    differ = {k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)}
    assert differ <= {"ss_output_name", "modelspec.title", "modelspec.date", "ss_training_finished_at",
                      "sshs_model_hash", "sshs_legacy_hash", "sdxl_stages"}, differ
    assert ma["ss_steps"] == "4" and ma["ss_network_dim"] == "4" and "ss_tag_frequency" in ma
    pa, pb = json.loads(ma["sdxl_stages"]), json.loads(mb["sdxl_stages"])
    assert pa["objective"] == pb["objective"] and pa["checkpoint"]["fingerprint"] == pb["checkpoint"]["fingerprint"]
    with safe_open(str(out / "loras" / "t-step-000004-ema.safetensors"), "pt") as e:
        assert json.loads(e.metadata()["sdxl_stages"])["checkpoint"]["weights"] == "ema"
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = trained.extra["steps_per_epoch"][0]
    assert [r["epoch"] for r in rows if "loss" in r] == [round(s / per_epoch, 4) for s in (1, 2, 3, 4)]


def test_per_epoch_checkpoints():
    from types import SimpleNamespace

    from stages.train import data as D

    schedule = D.Schedule((3, 3), 1)
    run = SimpleNamespace(schedule=schedule, cfg=SimpleNamespace(checkpointing=SimpleNamespace(
        checkpoint_every=100, checkpoint_epochs=True)))
    assert [s for s in range(1, 7) if loop.checkpoint_due(run, s)] == [3, 6]
    run.cfg.checkpointing.checkpoint_epochs = False
    assert [s for s in range(1, 7) if loop.checkpoint_due(run, s)] == [6]
    assert loop.epoch_position(schedule, 4) == pytest.approx(1 + 1 / 3)


def test_extending_a_finished_run_equals_running_the_longer_length_from_the_start(encoded, tmp_path, capsys):
    opts = dict(checkpoint_every=2, lora_dropout=0.1, ema_decay=0.9, warmup_steps=2)
    short = run_train(encoded, tmp_path / "a", max_steps=4, **opts)
    assert short.extra["steps"] == 4
    capsys.readouterr()
    longer = run_train(encoded, tmp_path / "a", max_steps=6, **opts)
    said = capsys.readouterr()
    assert "extending the finished run" in said.out and "resuming from" in said.out
    assert "schedule depends on the length" not in said.err  # warmup done, then constant: exact
    run_train(encoded, tmp_path / "b", max_steps=6, **opts)
    a, b = tmp_path / "a" / "checkpoints" / "step-000006", tmp_path / "b" / "checkpoints" / "step-000006"
    for name in ("weights", "ema", "optimizer", "rng-rank0"):
        assert same_tensors(a / f"{name}.safetensors", b / f"{name}.safetensors"), name
    for name in ("scheduler", "progress"):
        assert json.loads((a / f"{name}.json").read_text()) == json.loads((b / f"{name}.json").read_text()), name
    assert longer.extra["eval_loss"]["history"][:3] == short.extra["eval_loss"]["history"]


def test_schedule_change_of_an_extension_is_reported_when_the_rate_depends_on_the_length():
    from shared.core.config import resolve
    from stages import train
    from stages.train import extend, optim as O

    def optim(**kw):
        return resolve(train.Config, "train", {}, {"model": "builtin:tiny", **kw}).optim
    assert extend.schedule_change(O.make_scheduler, optim(warmup_steps=2), 4, 6, 4) is None
    assert extend.schedule_change(O.make_scheduler, optim(warmup_steps=8), 4, 6, 4) is None  # still warming up
    message = extend.schedule_change(O.make_scheduler, optim(lr_schedule="cosine"), 4, 6, 4)
    assert "trained over 4 steps, not 6" in message and "continues at step 4 with 0.25" in message


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """A DoRA LoRA (rank 4, alpha 2) on builtin:tiny's attention, exported as kohya and peft in float32."""
    from tests.test_export import _export, make_train_output

    tmp = tmp_path_factory.mktemp("init")
    train_out = make_train_output(tmp, preset="attn", dora=True)
    m = _export(train_out, tmp / "e", format=("kohya", "peft"), verify=False, dtype="float32")
    return train_out, {f: tmp / "e" / m.extra["formats"][f]["file"] for f in ("kohya", "peft")}


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_init_lora_loads_the_file_and_rescales_another_alpha(lora_files, fmt):
    from safetensors.torch import load_file

    from shared.models import loading as models
    from shared.models.lora import LoraSpec, apply_lora, lora_state
    from stages.train import initlora

    train_out, files = lora_files
    trained = load_file(str(train_out / "checkpoints" / "step-000200" / "weights.safetensors"))
    unet = models.load_model("builtin:tiny", ("unet",)).unet
    apply_lora(unet, LoraSpec("attn", 4, 8.0, 0.0, True))  # alpha 8 where the file has 2: B scaled by 2/8
    initlora.load(files[fmt], unet, LoraSpec("attn", 4, 8.0, 0.0, True))
    loaded = lora_state(unet)
    assert set(loaded) == {k[len("unet."):] for k in trained}
    for key, value in loaded.items():
        want = trained["unet." + key] * (0.25 if ".lora_B." in key else 1.0)
        assert torch.allclose(value, want.reshape(value.shape), rtol=1e-6, atol=0), key


def test_init_lora_mismatches_are_one_line_errors_naming_both(lora_files, encoded, tmp_path):
    from shared.core.errors import ConfigError

    _, files = lora_files
    with pytest.raises(ConfigError, match="rank 4, but lora_rank is 8"):
        run_train(encoded, tmp_path / "a", max_steps=1, init_lora=files["kohya"], lora_rank=8, dora=True)
    with pytest.raises(ConfigError, match="lora_preset attn\\+conv trains"):
        run_train(encoded, tmp_path / "b", max_steps=1, init_lora=files["peft"], lora_preset="attn+conv", dora=True)
    with pytest.raises(ConfigError, match="a DoRA, but dora is off"):
        run_train(encoded, tmp_path / "c", max_steps=1, init_lora=files["kohya"])
    m = run_train(encoded, tmp_path / "d", max_steps=1, init_lora=files["kohya"], dora=True, lora_alpha=2.0)
    assert m.inputs["init_lora"]["path"] == str(files["kohya"])


def test_only_a_longer_run_with_nothing_else_changed_is_an_extension():
    from types import SimpleNamespace

    from stages.train import extend

    inputs = {"encode": {"fingerprint": "e"}}
    prev = SimpleNamespace(stage="train", code_version="c", inputs={"encode": {"fingerprint": "e"}},
                           config={"max_steps": 4, "epochs": 1, "learning_rate": 1e-4, "output": "x"},
                           extra={"steps": 4, "final_checkpoint": "checkpoints/step-000004"})
    config = {"max_steps": 6, "epochs": 1, "learning_rate": 1e-4}
    assert extend.extendable(prev, config, inputs, "c")
    assert not extend.extendable(prev, {**config, "max_steps": 3}, inputs, "c")        # shorter: start over
    assert not extend.extendable(prev, {**config, "learning_rate": 2e-4}, inputs, "c")  # another training
    assert not extend.extendable(prev, config, {"encode": {"fingerprint": "f"}}, "c")   # other data
    assert not extend.extendable(prev, config, inputs, "d")                              # other code
