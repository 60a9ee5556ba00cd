"""Issue 24: results are not accepted as unchanged when what they came from was edited behind mtime's back: a
caption edited at the same length with its mtime put back, a model file edited in place the same way (the
hash cache is keyed on inode and ctime too, which no one can set)."""
import os

from shared.core.config import resolve
from shared.models import loading
from stages import ingest
from tests.conftest import caption, noise_image, save


def _edit_same_size_same_mtime(path, new: bytes) -> None:
    st = path.stat()
    assert len(new) == st.st_size
    path.write_bytes(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_caption_edited_with_its_mtime_put_back_is_ingested_again(tmp_path):
    img = save(noise_image(96, 96), tmp_path / "src" / "a.png")
    text = caption(img, "a red cat")
    cfg = resolve(ingest.Config, "ingest", {}, {"sources": (str(tmp_path / "src"),), "output": tmp_path / "w" / "i",
                                                "min_side": 64})
    assert ingest.run(cfg) is not None
    _edit_same_size_same_mtime(text, b"a big dog")
    again = ingest.run(cfg)
    assert again is not None   # not "unchanged, skipped"
    rows = (tmp_path / "w" / "i" / "items.jsonl").read_text()
    assert "a big dog" in rows and "a red cat" not in rows


def test_a_model_file_edited_in_place_changes_the_models_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    before = loading._file_hash(weights)
    _edit_same_size_same_mtime(weights, b"\1" * 64)
    assert loading._file_hash(weights) != before
