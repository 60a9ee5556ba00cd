"""Dataset layouts people already have: kohya's `<repeats>_<name>` folders and Hugging Face metadata.jsonl."""
import json
from pathlib import Path

import pytest

from shared.core.config import build
from shared.formats.jsonl import read_jsonl
from stages import ingest
from stages.cli import app
from stages.ingest import kohya, metadata
from tests.conftest import caption, make_dataset, noise_image, save


def run_ingest(src: Path, out: Path, sources: tuple | None = None, **kw):
    cfg = build(ingest.Config, {"sources": sources or (str(src),), "output": out, "workers": 1, **kw}, "[ingest]")
    manifest = ingest.run(cfg)
    items = {r["path"]: r for r in read_jsonl(out / "items.jsonl")}
    rejected = {r["path"]: r for r in read_jsonl(out / "rejected.jsonl")}
    return manifest, items, rejected


def assert_every_file_once(src: Path, items: dict, rejected: dict) -> None:
    on_disk = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    listed = [r["path"] for r in [*items.values(), *rejected.values()]]
    listed += [r["caption_path"] for r in [*items.values(), *rejected.values()] if r.get("caption_path")]
    assert sorted(listed) == on_disk


def image(path: Path, seed: int, text: str | None = None) -> Path:
    save(noise_image(300, 300, seed), path)
    if text is not None:
        caption(path, text)
    return path


# ---------------------------------------------------------------- kohya: folder names


@pytest.mark.parametrize("name, repeats, tokens, instance, klass", [
    ("10_sks dog", 10, "sks dog", "sks dog", "dog"),
    ("1_dog", 1, "dog", None, "dog"),
    ("5_my_cool_char", 5, "my_cool_char", None, "my_cool_char"),   # the part after the FIRST underscore
    ("20_ohwx  red car", 20, "ohwx  red car", "ohwx red car", "car"),
    ("3", 3, "", None, None),                                       # kohya: 3 repeats, no class tokens
    ("3_", 3, "", None, None),
    ("0_dog", 0, "dog", None, "dog"),                               # parsed; folder_problem refuses it
])
def test_folder_names_as_kohya_reads_them(name, repeats, tokens, instance, klass):
    subset = kohya.parse_folder_name(name)
    assert (subset.repeats, subset.tokens, subset.instance_prompt, subset.class_prompt) == \
        (repeats, tokens, instance, klass)


@pytest.mark.parametrize("name, problem", [
    ("raw", "is not named <repeats>_<name>"),
    ("dog_10", "is not named <repeats>_<name>"),
    ("0_dog", "asks for 0 repeats"),
    ("-2_dog", "asks for -2 repeats"),
    (f"{2 ** 31}_dog", "more than 10000"),
    ("10_sks dog", None),
])
def test_folder_problems(name, problem):
    found = kohya.folder_problem(name)
    assert (found is None) if problem is None else (problem in found)


def test_placement():
    assert kohya.placement("10_sks dog").repeats == 10
    assert "directly in the source folder" in kohya.placement("")
    assert "not named" in kohya.placement("raw")
    assert "inside '10_sks dog'" in kohya.placement("10_sks dog/old")


def make_kohya(root: Path) -> Path:
    """kohya's train_data_dir: two subsets, one folder kohya skips, files at the top and one folder deeper."""
    image(root / "10_sks dog" / "a.png", 1, "sks dog, sitting")
    image(root / "10_sks dog" / "b.png", 2)                   # no caption: kohya uses "sks dog"
    image(root / "1_dog" / "c.png", 3)                        # class-only folder
    image(root / "1_dog" / "d.png", 4, "a dog")
    image(root / "raw" / "e.png", 5, "unsorted")             # not <repeats>_<name>: kohya skips it
    image(root / "0_cat" / "f.png", 6)                        # 0 repeats: kohya skips it
    image(root / "10_sks dog" / "old" / "g.png", 7)           # kohya does not look inside a subset's folders
    image(root / "top.png", 8)                                # kohya reads subfolders only
    (root / "1_dog" / "notes.md").write_text("x")
    return root


def test_kohya_layout_sets_repeats_prompts_and_folder_captions(tmp_path):
    src = make_kohya(tmp_path / "img")
    manifest, items, rejected = run_ingest(src, tmp_path / "out", layout="kohya")
    assert sorted(items) == ["10_sks dog/a.png", "10_sks dog/b.png", "1_dog/c.png", "1_dog/d.png"]
    a, b, c, d = (items[p] for p in sorted(items))
    assert (a["repeats"], a["subset"], a["instance_prompt"], a["class_prompt"]) == (10, "10_sks dog", "sks dog", "dog")
    assert (c["repeats"], c["subset"], c["instance_prompt"], c["class_prompt"]) == (1, "1_dog", None, "dog")
    assert a["caption"] == "sks dog, sitting" and "caption_from" not in a
    assert (b["caption"], b["caption_from"], b["caption_path"], b["tags"]) == ("sks dog", "folder", None, ["sks dog"])
    assert (c["caption"], c["caption_from"]) == ("dog", "folder")
    assert d["caption"] == "a dog"
    assert list(a)[-5:] == ["repeats", "role", "subset", "instance_prompt", "class_prompt"]  # today's keys, then these
    outside = {p: r["detail"] for p, r in rejected.items() if r["reason"] == "outside_layout"}
    assert sorted(outside) == ["0_cat/f.png", "10_sks dog/old/g.png", "raw/e.png", "top.png"]
    assert "'raw' is not named <repeats>_<name>" in outside["raw/e.png"]
    assert rejected["raw/e.png"]["caption_path"] == "raw/e.txt"
    assert rejected["1_dog/notes.md"]["reason"] == "not_image"
    assert_every_file_once(src, items, rejected)
    assert manifest.counts["dropped"] == {"not_image": 1, "outside_layout": 4}
    assert manifest.counts["folder_captions"] == 2
    assert manifest.extra["layouts"] == {str(src.resolve()): "kohya"}


def test_kohya_folder_caption_can_be_turned_off_and_satisfies_caption_required(tmp_path):
    src = make_kohya(tmp_path / "img")
    _, items, _ = run_ingest(src, tmp_path / "o1", layout="kohya", caption_from_folder=False)
    assert items["10_sks dog/b.png"]["caption"] == "" and "caption_from" not in items["10_sks dog/b.png"]
    _, items, rejected = run_ingest(src, tmp_path / "o2", sources=({"path": str(src), "layout": "kohya",
                                                                    "caption_required": True},))
    assert items["10_sks dog/b.png"]["caption"] == "sks dog"
    _, items, rejected = run_ingest(src, tmp_path / "o3", layout="kohya", caption_from_folder=False,
                                    caption_required=True)
    assert rejected["10_sks dog/b.png"]["reason"] == "no_caption"


def test_plain_layout_is_todays_rows_and_auto_on_a_plain_folder_changes_nothing(tmp_path):
    src = make_kohya(tmp_path / "img")
    _, items, _ = run_ingest(src, tmp_path / "plain")
    assert len(items) == 8 and all(r["repeats"] == 1 and "subset" not in r for r in items.values())
    run_ingest(src, tmp_path / "auto", layout="auto")   # top.png and raw/: not kohya's layout
    for name in ("items.jsonl", "rejected.jsonl"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes()


@pytest.mark.parametrize("folders, top_image, expect", [
    (["10_sks dog", "1_dog"], False, "kohya"),
    (["10_sks dog", "raw"], False, "plain"),
    (["10_sks dog"], True, "plain"),
    (["2023_summer", "2024_winter"], False, "plain"),   # years are not repeats
    ([], True, "plain"),
])
def test_auto_layout(tmp_path, runner, folders, top_image, expect):
    src = tmp_path / "img"
    for i, folder in enumerate(folders):
        image(src / folder / "x.png", i)
    if top_image:
        image(src / "top.png", 99)
    result = runner.invoke(app, ["ingest", str(src), "--layout", "auto", "--out", str(tmp_path / "o"),
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"{expect} layout (auto: " in result.output
    repeats = {r["path"]: r["repeats"] for r in read_jsonl(tmp_path / "o" / "items.jsonl")}
    if expect == "kohya":
        assert repeats == {"10_sks dog/x.png": 10, "1_dog/x.png": 1}


def test_a_plain_source_that_looks_like_kohya_gets_a_note(tmp_path, runner):
    src = tmp_path / "img"
    image(src / "10_sks dog" / "x.png", 1)
    result = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o"), "--workers", "1"])
    assert result.exit_code == 0 and "looks like kohya's layout" in result.output
    assert next(read_jsonl(tmp_path / "o" / "items.jsonl"))["repeats"] == 1


def test_kohya_rows_do_not_depend_on_workers(tmp_path):
    src = tmp_path / "img"
    make_dataset(src / "3_sks dog", count=40)
    make_dataset(src / "1_dog", count=30, seed=5)
    (src / "1_dog" / "metadata.jsonl").write_text(json.dumps({"file_name": "img_000.png", "text": "meta"}) + "\n")
    for workers in (1, 2):
        run_ingest(src, tmp_path / f"o{workers}", layout="kohya", workers=workers)
    for name in ("items.jsonl", "rejected.jsonl"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()


# ---------------------------------------------------------------- metadata.jsonl


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@pytest.mark.parametrize("line, column, message", [
    ("{not json", None, "line 1: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[1, 2]", None, "line 1: an array, not a JSON object"),
    ('{"text": "x"}', None, "line 1: no file_name"),
    ('{"file_name": 3, "text": "x"}', None, "line 1: file_name is a number, not a string"),
    ('{"file_name": " ", "text": "x"}', None, "line 1: file_name is empty"),
    ('{"file_name": "../x.png", "text": "x"}', None, "line 1: file_name '../x.png' is outside the metadata"),
    ('{"file_name": "/etc/x.png", "text": "x"}', None, "is outside the metadata file's folder"),
    ('{"file_name": "x.png"}', None, "line 1: no caption column (text or caption)"),
    ('{"file_name": "x.png", "text": null}', None, "line 1: 'text' is null, not a string"),
    ('{"file_name": "x.png", "text": ["a", "b"]}', None, "line 1: 'text' is an array, not a string"),
    ('{"file_name": "x.png", "text": "a"}', "prompt", "line 1: no 'prompt' column"),
])
def test_metadata_bad_lines_are_one_line_reasons(line, column, message):
    entries, bad = metadata.parse(line.encode() + b"\n", column)
    assert not entries and len(bad) == 1 and message in bad[0], bad


def test_metadata_parse_columns_normalisation_duplicates_and_encoding():
    data = (b"\xef\xbb\xbf" + lines({"file_name": "./a.png", "text": " a\n cat ", "caption": "ignored"},
                                   {"file_name": "sub//b.png", "caption": "b"}, "",
                                   {"file_name": "a.png", "text": "again"}).encode()
            + b'{"file_name": "c.png", "text": "\xff"}\n')
    entries, bad = metadata.parse(data)
    assert {k: (e.caption, e.line) for k, e in entries.items()} == {"a.png": ("a cat", 1), "sub/b.png": ("b", 2)}
    assert bad == ["line 4: 'a.png' again (first on line 1); the first is used", "line 5: not UTF-8 text"]
    entries, bad = metadata.parse(data, "caption")
    assert {k: e.caption for k, e in entries.items()} == {"a.png": "ignored", "sub/b.png": "b"}


def make_hf(root: Path) -> Path:
    """An imagefolder: a root metadata.jsonl, a nested one, a sidecar that competes, missing files, bad lines."""
    image(root / "a.png", 1)
    image(root / "c.png", 3, "from the sidecar")
    image(root / "d.png", 4)                                   # listed nowhere: no caption
    image(root / "sub" / "b.png", 2)
    image(root / "sub" / "e.png", 5)
    (root / "notes.txt").write_text("x")                      # an orphan caption, as before
    (root / "metadata.jsonl").write_text(lines(
        {"file_name": "a.png", "text": "a cat"},
        {"file_name": "sub/b.png", "text": "root says b"},     # shadowed by sub/metadata.jsonl
        {"file_name": "sub/e.png", "caption": "an e"},         # the caption column
        {"file_name": "c.png", "text": "loses to the sidecar"},
        {"file_name": "gone.png", "text": "no such file"},
        {"file_name": "notes.txt", "text": "not an image"},
        "{oops",
    ))
    (root / "sub" / "metadata.jsonl").write_text(lines({"file_name": "b.png", "text": "a b"},
                                                       {"file_name": "missing/x.png", "text": "x"}))
    return root


def test_metadata_captions_root_and_nested(tmp_path):
    src = make_hf(tmp_path / "hf")
    manifest, items, rejected = run_ingest(src, tmp_path / "out")
    a, b, e = items["a.png"], items["sub/b.png"], items["sub/e.png"]
    assert (a["caption"], a["caption_encoding"], a["caption_from"], a["metadata_path"], a["caption_path"]) == \
        ("a cat", "utf-8", "metadata", "metadata.jsonl", None)
    assert (b["caption"], b["metadata_path"]) == ("a b", "sub/metadata.jsonl")
    assert (e["caption"], e["metadata_path"]) == ("an e", "metadata.jsonl")
    assert items["c.png"]["caption"] == "from the sidecar" and "caption_from" not in items["c.png"]
    assert items["d.png"]["caption"] == "" and "caption_from" not in items["d.png"]
    root = rejected["metadata.jsonl"]
    assert root["reason"] == "metadata"
    assert root["detail"] == ("caption table: 2 captions used; 1 ignored: the image has a caption file; 1 ignored: "
                              "a nearer metadata.jsonl lists the image; 1 names a missing file; 1 names a file not "
                              "taken as an image; 1 bad line")
    assert rejected["sub/metadata.jsonl"]["detail"] == "caption table: 1 caption used; 1 names a missing file"
    assert root["missing"] == ["gone.png"] and root["unmatched"] == ["notes.txt"]
    assert root["bad_lines"][0].startswith("line 7: not valid JSON")
    assert rejected["sub/metadata.jsonl"]["missing"] == ["missing/x.png"]
    assert rejected["notes.txt"]["reason"] == "orphan_caption"
    assert_every_file_once(src, items, rejected)
    assert "metadata" not in manifest.counts["dropped"]
    assert (manifest.counts["metadata_files"], manifest.counts["metadata_captions"]) == (2, 3)
    assert manifest.counts["in"] == 9    # 5 images, their 1 caption file, 1 orphan caption, 2 metadata files
    assert manifest.counts["out"] + sum(manifest.counts["dropped"].values()) + 2 == 8   # one row each


def test_metadata_off_caption_column_and_caption_required(tmp_path):
    src = make_hf(tmp_path / "hf")
    _, items, rejected = run_ingest(src, tmp_path / "off", metadata=False)
    assert rejected["metadata.jsonl"]["reason"] == "not_image" and items["a.png"]["caption"] == ""
    _, items, rejected = run_ingest(src, tmp_path / "col", caption_column="caption")
    assert items["sub/e.png"]["caption"] == "an e" and items["a.png"]["caption"] == ""
    assert "line 1: no 'caption' column" in rejected["metadata.jsonl"]["bad_lines"]
    (src / "metadata.jsonl").write_text(lines({"file_name": "a.png", "text": "  "}))
    _, items, rejected = run_ingest(src, tmp_path / "req", caption_required=True)
    assert rejected["a.png"]["reason"] == "no_caption"
    assert rejected["a.png"]["detail"] == "its caption in metadata.jsonl is empty"


def test_metadata_in_a_kohya_folder_beats_the_folder_name(tmp_path):
    src = tmp_path / "img"
    image(src / "10_sks dog" / "a.png", 1)
    image(src / "10_sks dog" / "b.png", 2)
    (src / "10_sks dog" / "metadata.jsonl").write_text(lines({"file_name": "a.png", "text": "sks dog on grass"}))
    _, items, rejected = run_ingest(src, tmp_path / "out", layout="kohya")
    assert (items["10_sks dog/a.png"]["caption"], items["10_sks dog/a.png"]["caption_from"]) == \
        ("sks dog on grass", "metadata")
    assert (items["10_sks dog/b.png"]["caption"], items["10_sks dog/b.png"]["caption_from"]) == ("sks dog", "folder")
    assert items["10_sks dog/a.png"]["repeats"] == 10
    assert rejected["10_sks dog/metadata.jsonl"]["reason"] == "metadata"


def test_metadata_problems_are_a_warning_line_not_a_traceback(tmp_path, runner):
    src = make_hf(tmp_path / "hf")
    (src / "sub" / "metadata.jsonl").write_bytes(b"\x00\xff garbage\n{\"file_name\": 5}\n")
    result = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert warnings[0].endswith("hf/metadata.jsonl: 1 row names a missing file (gone.png); 1 bad line (line 7: "
                                "not valid JSON (Expecting property name enclosed in double quotes at column 2))")
    assert warnings[1].endswith("sub/metadata.jsonl: 2 bad lines (line 1: not UTF-8 text, ...)")
    assert "metadata.jsonl files (read for captions)" in result.output


def test_unreadable_or_broken_metadata_file(tmp_path):
    src = tmp_path / "hf"
    image(src / "a.png", 1)
    (src / "metadata.jsonl").symlink_to(src / "nowhere.jsonl")
    _, items, rejected = run_ingest(src, tmp_path / "out")
    assert rejected["metadata.jsonl"]["reason"] == "broken_link" and items["a.png"]["caption"] == ""


def test_a_changed_metadata_file_reruns_ingest(tmp_path, runner):
    src = make_hf(tmp_path / "hf")
    args = ["ingest", str(src), "--out", str(tmp_path / "o"), "--workers", "1"]
    assert runner.invoke(app, args).exit_code == 0
    assert "unchanged, skipped" in runner.invoke(app, args).output
    (src / "metadata.jsonl").write_text(lines({"file_name": "a.png", "text": "a new caption"}))
    assert runner.invoke(app, args).exit_code == 0
    assert next(r for r in read_jsonl(tmp_path / "o" / "items.jsonl") if r["path"] == "a.png")["caption"] == \
        "a new caption"


# ---------------------------------------------------------------- DreamBooth roles


def test_a_class_source_marks_its_items_and_the_mark_reaches_the_plan(tmp_path):
    from stages import bucket
    from shared.formats.plan import read_plan
    from shared.core.config import resolve

    image(tmp_path / "me" / "a.png", 1, "sks dog")
    image(tmp_path / "dogs" / "b.png", 2, "a dog")
    work = tmp_path / "w"
    sources = ({"path": str(tmp_path / "me")}, {"path": str(tmp_path / "dogs"), "role": "class"})
    _, items, _ = run_ingest(tmp_path, work / "ingest", sources=sources)
    assert {p: r["role"] for p, r in items.items()} == {"a.png": "instance", "b.png": "class"}
    bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, "max_area": 128 * 128, "min_side": 64}))
    assert {Path(r.path).name: r.role for r in read_plan(work / "bucket")} == {"a.png": "instance",
                                                                              "b.png": "class"}
    with pytest.raises(Exception, match="role"):
        build(ingest.Config, {"sources": ({"path": "x", "role": "prior"},)}, "[ingest]")
