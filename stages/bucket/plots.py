"""Small charts drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def bar_chart(labels: Sequence[str], values: Sequence[int], title: str) -> Image.Image:
    """A horizontal bar chart: one labelled row per value."""
    font = ImageFont.load_default()
    row, label_w, bar_w, pad = 18, 90, 360, 10
    height = pad * 3 + row * (len(values) + 1)
    img = Image.new("RGB", (label_w + bar_w + 80, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, fill="black", font=font)
    top = max(values, default=0) or 1
    for i, (label, value) in enumerate(zip(labels, values)):
        y = pad * 2 + row * (i + 1)
        draw.text((pad, y), label, fill="black", font=font)
        length = int(bar_w * value / top)
        draw.rectangle([label_w, y + 2, label_w + max(length, 1), y + row - 4], fill=(70, 110, 200))
        draw.text((label_w + length + 6, y), str(value), fill="black", font=font)
    return img
