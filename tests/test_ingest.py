import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from shared.core.config import build
from shared.formats.jsonl import read_jsonl
from stages import ingest
from stages.cli import app
from tests.conftest import caption, jpeg_bytes, make_dataset, noise_image, png_with_header_size, save


def make_bad_folder(root: Path) -> dict[str, str]:
    """One file of every kind of bad (and awkward-but-good) input; returns path -> expected outcome."""
    expect = {}
    good = save(noise_image(300, 300, 1), root / "good.png")
    caption(good, "a, b")
    expect["good.png"] = "ok"
    (root / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = "unreadable"
    (root / "notes.png").write_text("this is not a png")
    expect["notes.png"] = "not_image"
    full = jpeg_bytes(noise_image(400, 300, 2), quality=90)
    (root / "truncated.jpg").write_bytes(full[: len(full) * 6 // 10])
    expect["truncated.jpg"] = "truncated@verify"
    png = bytearray((save(noise_image(300, 300, 3), root / "tmp.png")).read_bytes())
    (root / "tmp.png").unlink()
    mid = len(png) // 2
    png[mid:mid + 64] = bytes(64)
    (root / "corrupt.png").write_bytes(bytes(png))
    expect["corrupt.png"] = "unreadable@verify"
    (root / "bomb.png").write_bytes(png_with_header_size(60000, 60000))
    expect["bomb.png"] = "too_large"
    save(noise_image(32, 32, 4), root / "tiny.png")
    expect["tiny.png"] = "too_small"
    shutil.copy(good, root / "zz_copy" / "dup.png") if (root / "zz_copy").mkdir() is None else None
    expect["zz_copy/dup.png"] = "duplicate"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 400x300 -> upright 300x400
    save(noise_image(400, 300, 5), root / "rotated.jpg", "JPEG", exif=exif.tobytes())
    expect["rotated.jpg"] = "ok"
    save(noise_image(300, 300, 6, "CMYK"), root / "cmyk.jpg", "JPEG")
    expect["cmyk.jpg"] = "ok"
    save(Image.new("I;16", (300, 300), 40000), root / "deep16.png")
    expect["deep16.png"] = "ok"
    save(noise_image(300, 300, 7).convert("P"), root / "palette.png", transparency=0)
    expect["palette.png"] = "ok"
    save(noise_image(300, 300, 8, "RGBA"), root / "alpha.webp", "WEBP")
    expect["alpha.webp"] = "ok"
    frames = [noise_image(300, 300, s).convert("P") for s in (9, 10)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    expect["anim.gif"] = "ok"
    save(noise_image(300, 300, 11), root / "pic.bmp")
    expect["pic.bmp"] = "ok"
    save(noise_image(300, 300, 12), root / "pic.tiff")
    expect["pic.tiff"] = "ok"
    uni = save(noise_image(320, 300, 13), root / "fotos ä" / "bild 1 ✓.jpg")
    caption(uni, "café, naïve".encode("cp1252"))
    expect["fotos ä/bild 1 ✓.jpg"] = "ok"
    (root / "orphan.txt").write_text("nobody's caption")
    expect["orphan.txt"] = "orphan_caption"
    (root / "README.md").write_text("notes")
    expect["README.md"] = "not_image"
    return expect


def run_ingest(src: Path, out: Path, **kw):
    cfg = build(ingest.Config, {"sources": (str(src),), "output": out, "workers": 1, **kw}, "[ingest]")
    manifest = ingest.run(cfg)
    items = {r["path"]: r for r in read_jsonl(out / "items.jsonl")}
    rejected = {r["path"]: r for r in read_jsonl(out / "rejected.jsonl")}
    return manifest, items, rejected


@pytest.mark.parametrize("verify", [False, True])
def test_every_bad_input_is_classified(tmp_path, verify):
    expect = make_bad_folder(tmp_path / "src")
    manifest, items, rejected = run_ingest(tmp_path / "src", tmp_path / "out", verify=verify)
    for path, outcome in expect.items():
        outcome, _, when = outcome.partition("@")
        if outcome == "ok" or (when == "verify" and not verify):
            assert path in items, (path, rejected.get(path))
        else:
            assert path not in items and rejected[path]["reason"] == outcome, (path, rejected.get(path))
    assert rejected["zz_copy/dup.png"]["duplicate_of"] == "good.png"
    assert (items["rotated.jpg"]["width"], items["rotated.jpg"]["height"]) == (300, 400)
    assert items["rotated.jpg"]["orientation"] == 6
    assert items["cmyk.jpg"]["mode"] == "CMYK"
    assert items["deep16.png"]["mode"] in ("I;16", "I")
    uni = items["fotos ä/bild 1 ✓.jpg"]
    assert uni["caption"] == "café, naïve" and uni["caption_encoding"] == "cp1252"
    assert uni["tags"] == ["café", "naïve"]
    assert manifest.counts["in"] == len(expect) + 2  # two paired captions
    assert sum(manifest.counts["dropped"].values()) + manifest.counts["out"] == len(expect)
    assert manifest.counts["captions"] == 2


def test_every_file_is_accounted_for_exactly_once(tmp_path):
    make_bad_folder(tmp_path / "src")
    _, items, rejected = run_ingest(tmp_path / "src", tmp_path / "out", verify=True)
    on_disk = {str(p.relative_to(tmp_path / "src")) for p in (tmp_path / "src").rglob("*") if p.is_file()}
    listed = []
    for row in list(items.values()) + list(rejected.values()):
        listed.append(row["path"])
        if row.get("caption_path"):
            listed.append(row["caption_path"])
    assert sorted(listed) == sorted(on_disk)


def test_caption_required_per_source(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save(noise_image(300, 300, 1), a / "x.png")
    save(noise_image(300, 300, 2), b / "y.png")
    caption(save(noise_image(300, 300, 3), b / "z.png"), "   \n")  # blank caption counts as none
    cfg = build(ingest.Config, {"sources": ({"path": str(a)}, {"path": str(b), "caption_required": True}),
                                "output": tmp_path / "out", "workers": 1}, "[ingest]")
    ingest.run(cfg)
    items = [r["path"] for r in read_jsonl(tmp_path / "out" / "items.jsonl")]
    rejected = {r["path"]: r for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")}
    assert items == ["x.png"]
    assert rejected["y.png"]["reason"] == "no_caption" and rejected["z.png"]["reason"] == "no_caption"


def test_ids_order_and_output_do_not_depend_on_workers(tmp_path):
    make_dataset(tmp_path / "src", count=80)
    for workers in (1, 2):
        cfg = build(ingest.Config, {"sources": (str(tmp_path / "src"),), "output": tmp_path / f"o{workers}",
                                    "workers": workers}, "[ingest]")
        ingest.run(cfg)
    one = (tmp_path / "o1" / "items.jsonl").read_bytes()
    assert one == (tmp_path / "o2" / "items.jsonl").read_bytes()
    rows = [json.loads(x) for x in one.splitlines()]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert all(r["id"] == r["sha256"][:16] for r in rows)


def test_tag_counts_and_weights_written(tmp_path):
    make_dataset(tmp_path / "src", count=12)
    _, items, _ = run_ingest(tmp_path / "src", tmp_path / "out")
    counts = json.loads((tmp_path / "out" / "tag_counts.json").read_text())
    assert counts["common"] == 12 and counts["tag0"] == 4 and counts["shape 0"] == 6
    weights = [r["tag_weight"] for r in items.values()]
    assert abs(sum(weights) / len(weights) - 1.0) < 1e-6
    assert all(0.5 <= w <= 2.0 for w in weights)


def test_rerun_skips_and_source_change_reruns(tmp_path, runner):
    make_dataset(tmp_path / "src", count=4)
    args = ["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert runner.invoke(app, args).exit_code == 0
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "ingest: unchanged, skipped" in second.output
    save(noise_image(300, 300, 99), tmp_path / "src" / "new.png")
    third = runner.invoke(app, args)
    assert "ingest: runs: input changed: source:" in third.output
    assert third.exit_code == 0


def test_missing_source_and_no_images_are_clean_errors(tmp_path, runner):
    result = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "source folder not found" in result.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    result = runner.invoke(app, ["ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no usable images" in result.stderr
    assert not (tmp_path / "o").exists()
    result = runner.invoke(app, ["ingest", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "sources: none given" in result.stderr


def test_read_caption_encodings():
    assert ingest.read_caption("a,  b\n c".encode()) == ("a, b c", "utf-8")
    assert ingest.read_caption(b"\xef\xbb\xbfbom") == ("bom", "utf-8")
    assert ingest.read_caption("ünï".encode("utf-16")) == ("ünï", "utf-16")
    assert ingest.read_caption("café".encode("cp1252")) == ("café", "cp1252")
    assert ingest.read_caption(b"\x81\x8d") == ("\x81\x8d", "latin-1")


def test_work_folder_inside_a_source_is_not_ingested(tmp_path, runner):
    src = make_dataset(tmp_path / "src", count=3)
    inside = runner.invoke(app, ["ingest", str(src), "--workdir", str(src / "work"), "--workers", "1"])
    assert inside.exit_code == 2 and "lies inside the source folder" in inside.stderr  # outputs stay out of sources
    assert not (src / "work").exists()
    make_dataset(src / "work" / "bucket", count=2)  # a work folder inside the source, with files in it
    args = ["ingest", str(src), "--workdir", str(src / "work"), "--out", str(tmp_path / "ingest"), "--workers", "1"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert "ingest: unchanged, skipped" in again.output
    paths = [r["path"] for r in read_jsonl(tmp_path / "ingest" / "items.jsonl")]
    assert len(paths) == 3 and not any(p.startswith("work") for p in paths)


def test_file_names_that_are_not_utf8(tmp_path):
    import os

    src = tmp_path / "src"
    src.mkdir()
    raw = os.path.join(os.fsencode(src), b"caf\xe9 1.png")
    noise_image(300, 300, 3).save(open(raw, "wb"), "PNG")
    with open(os.path.join(os.fsencode(src), b"caf\xe9 1.txt"), "wb") as fh:
        fh.write(b"a, b")
    _, items, rejected = run_ingest(src, tmp_path / "out")
    assert not rejected and len(items) == 1
    row = next(iter(items.values()))
    assert row["tags"] == ["a", "b"]
    assert Path(row["source"], row["path"]).is_file()   # the stored path opens the very file


# ---------------------------------------------------------------- issue 17: folders, links, encodings


def _scandir_refusing(monkeypatch, folder: Path) -> None:
    """os.scandir raising EACCES for `folder`, as for a folder without read permission (root reads anyway)."""
    import errno
    import os

    real = os.scandir

    def scandir(path="."):
        if os.path.abspath(os.fspath(path)) == str(folder):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_subfolder_is_a_rejected_row(tmp_path, monkeypatch):
    src = make_dataset(tmp_path / "src", count=2)
    make_dataset(src / "locked", count=3, seed=1)
    make_dataset(src / "open", count=1, seed=2)
    _scandir_refusing(monkeypatch, src / "locked")
    manifest, items, rejected = run_ingest(src, tmp_path / "out")
    assert rejected["locked"]["reason"] == "unreadable"
    assert rejected["locked"]["detail"] == "folder: Permission denied"
    assert sorted(items) == ["img_000.png", "img_001.png", "open/img_000.png"]
    assert manifest.counts["dropped"] == {"unreadable": 1}


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads a folder without read permission")
def test_unreadable_subfolder_for_real(tmp_path):
    src = make_dataset(tmp_path / "src", count=2)
    make_dataset(src / "locked", count=1, seed=1)
    (src / "locked").chmod(0o000)
    try:
        _, items, rejected = run_ingest(src, tmp_path / "out")
    finally:
        (src / "locked").chmod(0o755)
    assert rejected["locked"]["reason"] == "unreadable" and len(items) == 2


def test_symlinked_folders_are_followed_once_and_loops_are_rows(tmp_path):
    src = tmp_path / "src"
    make_dataset(src / "real", count=2)
    outside = make_dataset(tmp_path / "outside", count=2, seed=7)
    (src / "linked").symlink_to(outside)             # followed
    (src / "real" / "back").symlink_to(src)           # a loop
    (src / "alias").symlink_to(src / "real")          # the same folder again
    manifest, items, rejected = run_ingest(src, tmp_path / "out")
    assert sorted(items) == ["linked/img_000.png", "linked/img_001.png", "real/img_000.png", "real/img_001.png"]
    assert rejected["real/back"]["reason"] == "symlink_loop"
    assert rejected["alias"]["reason"] == "duplicate" and rejected["alias"]["duplicate_of"] == "real"
    assert set(rejected) == {"real/back", "alias"}
    assert manifest.counts["dropped"] == {"duplicate": 1, "symlink_loop": 1}


def test_broken_and_self_referencing_links_are_rows_not_a_crash(tmp_path, runner):
    src = make_dataset(tmp_path / "src", count=2)
    (src / "gone.png").symlink_to(src / "nothing.png")
    (src / "self.png").symlink_to(src / "self.png")
    (src / "gone_folder").symlink_to(tmp_path / "nowhere")
    before = ingest.listing_fingerprint(src)
    result = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    rejected = {r["path"]: r for r in read_jsonl(tmp_path / "out" / "rejected.jsonl")}
    assert {k: r["reason"] for k, r in rejected.items()} == {"gone.png": "broken_link", "self.png": "broken_link",
                                                            "gone_folder": "broken_link"}
    assert "No such file or directory" in rejected["gone.png"]["detail"]
    assert "Too many levels of symbolic links" in rejected["self.png"]["detail"]
    save(noise_image(300, 300, 9), src / "nothing.png")   # the link now resolves: the listing changed
    assert ingest.listing_fingerprint(src) != before


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_caption_without_bom(tmp_path, encoding):
    text = "grüne Wiese, 日本, long_hair"
    assert ingest.read_caption(text.encode(encoding)) == (text, encoding)
    assert ingest.read_caption("a".encode(encoding)) == ("a", encoding)
    src = tmp_path / "src"
    caption(save(noise_image(300, 300, 1), src / "x.png"), text.encode(encoding))
    _, items, _ = run_ingest(src, tmp_path / "out")
    assert items["x.png"]["caption"] == text and items["x.png"]["caption_encoding"] == encoding
    assert items["x.png"]["tags"] == ["grüne Wiese", "日本", "long_hair"]


def test_text_without_nul_bytes_is_not_taken_for_utf16():
    assert ingest.read_caption("日本, a".encode("utf-8")) == ("日本, a", "utf-8")
    assert ingest.read_caption(b"ab") == ("ab", "utf-8")
    assert ingest.read_caption(b"a\x00b\x00c") == ("a b c", "utf-8")   # odd length: not UTF-16, NULs are spaces
