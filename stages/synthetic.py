"""A deterministic synthetic dataset: coloured shapes on coloured backgrounds, with sidecar tag captions.

The captions fully describe what is drawn (shape, its colour, background colour, size), so a model trained on
them has something learnable; images come in varied sizes, aspect ratios and formats (JPEG, PNG, WebP).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 1 / 2)
FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))


@dataclass(frozen=True)
class Sample:
    name: str
    shape: str
    colour: str
    background: str
    large: bool
    width: int
    height: int
    ext: str
    fmt: str

    @property
    def caption(self) -> str:
        return ", ".join([f"{self.colour} {self.shape}", f"{self.background} background",
                          "large" if self.large else "small", self.shape])


def plan_samples(count: int, seed: int, min_side: int = 192, max_side: int = 640) -> list[Sample]:
    """`count` sample descriptions, the same for the same arguments."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        colour, background = rng.sample(sorted(COLOURS), 2)
        aspect = rng.choice(ASPECTS)
        short = rng.randint(min_side, max(min_side, int(max_side / max(aspect, 1 / aspect))))
        w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
        ext, fmt = FORMATS[i % len(FORMATS)]
        out.append(Sample(f"{i:05d}", rng.choice(SHAPES), colour, background, rng.random() < 0.5, w, h, ext, fmt))
    return out


def render(sample: Sample) -> Image.Image:
    img = Image.new("RGB", (sample.width, sample.height), COLOURS[sample.background])
    draw = ImageDraw.Draw(img)
    side = min(sample.width, sample.height) * (0.7 if sample.large else 0.35)
    cx, cy = sample.width / 2, sample.height / 2
    box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
    fill = COLOURS[sample.colour]
    if sample.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif sample.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def generate_dataset(folder: Path, count: int = 64, seed: int = 0) -> Path:
    """Write the dataset into `folder` (images in two subfolders, captions beside them); reuse it when a
    previous call with the same arguments finished there."""
    folder = Path(folder)
    stamp = folder.with_name(folder.name + ".json")  # outside, so ingest does not see it
    params = {"count": count, "seed": seed, "generator": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for sample in plan_samples(count, seed):
        sub = folder / ("shapes" if sample.shape != "triangle" else "triangles")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{sample.name}.{sample.ext}"
        render(sample).save(path, sample.fmt, **({"quality": 92} if sample.fmt != "PNG" else {}))
        path.with_suffix(".txt").write_text(sample.caption + "\n", encoding="utf-8")
    stamp.write_text(json.dumps(params) + "\n")
    return folder
