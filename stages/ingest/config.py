"""The ingest stage's configuration: the [ingest] table and its per-source [[ingest.sources]] tables."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from shared.core import artifacts
from shared.core.config import opt
from shared.core.errors import ConfigError

#: the most repeats a source or a kohya folder may ask for: each repeat is an entry of train's epoch, so a
#: folder `999999999_x` would need gigabytes before the first step (kohya's own folders name tens)
MAX_REPEATS = 10_000

LAYOUTS = ("plain", "kohya", "auto")
#: what a source's images are for: the subject trained (instance), or DreamBooth's class images, whose loss
#: train weights by prior_loss_weight (prior preservation)
ROLES = ("instance", "class")


@dataclass(frozen=True)
class Source:
    """One source folder; unset options fall back to the [ingest] table's values."""
    path: Path = opt(Path("."), "Folder walked recursively for images and captions.")
    repeats: int | None = opt(None, "Times each image of this source is seen per epoch.", ge=1, le=MAX_REPEATS)
    caption_ext: str | None = opt(None, "Extension of sidecar caption files.", nonempty=True)
    caption_required: bool | None = opt(None, "Reject images without a caption (reason no_caption).")
    tag_separator: str | None = opt(None, "Separator between tags in a caption.", nonempty=True)
    layout: str | None = opt(None, "How the source's folders are read: plain, kohya or auto.", choices=LAYOUTS)
    caption_from_folder: bool | None = opt(None, "kohya layout: caption an image that has none with its "
                                                 "folder's tokens.")
    metadata: bool | None = opt(None, "Read captions from metadata.jsonl files.")
    caption_column: str | None = opt(None, "metadata.jsonl column holding the caption.", nonempty=True)
    role: str = opt("instance", "instance: images of what is trained; class: DreamBooth class (regularisation) "
                                "images, whose loss train weights by prior_loss_weight.", choices=ROLES)


@dataclass(frozen=True)
class Config:
    sources: tuple[Source, ...] = opt((), "Source folders. In TOML: a list of paths or [[ingest.sources]] "
                                      "tables with per-source repeats, caption_ext, caption_required, "
                                      "tag_separator, layout, caption_from_folder, metadata, caption_column, role.",
                                      positional=True)
    workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                        pipeline=True, fingerprint=False)
    output: Path | None = opt(None, "Output folder [default: <workdir>/ingest].", flag="--out",
                              fingerprint=False)
    repeats: int = opt(1, "Default times each image is seen per epoch.", ge=1, le=MAX_REPEATS)
    caption_ext: str = opt(".txt", "Default sidecar caption extension (image.png -> image.txt).", nonempty=True)
    caption_required: bool = opt(False, "Reject images without a caption instead of keeping an empty one.")
    tag_separator: str = opt(",", "Default separator between tags in a caption.", nonempty=True)
    layout: str = opt("plain", "How a source's folders are read: plain (every image, with the source's "
                               "repeats); kohya (kohya's <repeats>_<name> subfolders give each image its repeats "
                               "and DreamBooth tokens; images elsewhere are rejected as outside_layout); auto "
                               "(kohya when every subfolder is so named and no image lies at the top, else "
                               "plain).", choices=LAYOUTS)
    caption_from_folder: bool = opt(True, "kohya layout: an image with neither a caption file nor a "
                                          "metadata.jsonl caption takes its folder's name after the repeats as "
                                          "its caption ('10_sks dog' -> 'sks dog'), as kohya does.")
    metadata: bool = opt(True, "Read captions from metadata.jsonl files (Hugging Face imagefolder: file_name + "
                               "a caption column), at the source root or in any folder; a caption file wins.")
    caption_column: str | None = opt(None, "metadata.jsonl column holding the caption [default: text, else "
                                           "caption].", nonempty=True)
    lowercase_tags: bool = opt(False, "Lower-case tags.")
    underscores_to_spaces: bool = opt(False, "Turn underscores in tags into spaces (long_hair -> long hair).")
    verify: bool = opt(False, "Decode every image fully to catch truncated or corrupt files (slower).")
    min_side: int = opt(256, "Reject images whose shorter side is below this (too_small).", ge=1)
    max_pixels: int = opt(100_000_000, "Reject images with more pixels than this, from the header, before "
                                       "decoding (too_large; decompression-bomb guard).", ge=1)
    tag_weighting: bool = opt(True, "Compute tag-frequency loss weights (otherwise every item weighs 1).")
    tag_weight_power: float = opt(0.5, "Exponent p of the per-tag weight (median_count / count) ** p; 0 = "
                                       "every tag weighs the same.", ge=0)
    tag_weight_min: float = opt(0.5, "Lower clamp of an item's tag weight (the mean weight is 1).", gt=0, le=1)
    tag_weight_max: float = opt(2.0, "Upper clamp of an item's tag weight (the mean weight is 1).", ge=1)
    workers: int = opt(0, "Worker processes (0 = one per CPU core, at most 8; 1 = in-process).", ge=0,
                       fingerprint=False)

    def __post_init__(self) -> None:
        if not self.sources:  # ranges, types and empty strings are checked by shared.core.config.build
            raise ConfigError("sources: none given; pass SOURCE folders or set [ingest] sources")
        object.__setattr__(self, "output", self.output or self.workdir / "ingest")  # resolved, as recorded

    @property
    def out_dir(self) -> Path:
        return self.output

    def own_folders(self) -> frozenset[Path]:
        """Folders the pipeline writes, never walked as data even when a source contains them."""
        out = self.out_dir.expanduser().resolve()
        return frozenset({self.workdir.expanduser().resolve(), out, artifacts.staging_dir(out)})

    def effective(self, src: Source) -> Source:
        """A source with every unset option filled from this table."""
        return replace(src, path=src.path.expanduser().resolve(),
                       repeats=src.repeats if src.repeats is not None else self.repeats,
                       caption_ext=_dot(src.caption_ext if src.caption_ext is not None else self.caption_ext),
                       caption_required=(src.caption_required if src.caption_required is not None
                                         else self.caption_required),
                       tag_separator=_given(src.tag_separator, self.tag_separator),
                       layout=_given(src.layout, self.layout),
                       caption_from_folder=_given(src.caption_from_folder, self.caption_from_folder),
                       metadata=_given(src.metadata, self.metadata),
                       caption_column=_given(src.caption_column, self.caption_column))


def _given(value, default):
    return value if value is not None else default


def _dot(ext: str) -> str:
    return ext.lower() if ext.startswith(".") else "." + ext.lower()

