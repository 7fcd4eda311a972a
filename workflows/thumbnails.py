"""The thumbnail card of a template (a PIL image): what ComfyUI's template browser shows for it.

A dark card with the task as title, the mode and the video's size below, and the shape of a
profile's timeline (loading, preprocessing, encoding, the steps, the decode) in the colours the
report's chart uses. Drawn with Pillow's own scalable font, so no font file is needed.
"""

from __future__ import annotations

from typing import Any

# Band colours of the report's chart (profiling/chart.py): init, preprocess, encode, step loading,
# step inference, decode.
STAGE_COLOURS = ("#8c8c8c", "#b38bd9", "#e0a84f", "#d95f5f", "#4f8fd9", "#5fbf6a")


def draw_card(size: tuple[int, int], *, title: str, subtitle: str, facts: str) -> Any:
    """A `size` card: `title`, `subtitle`, `facts` and a stylised stage timeline."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    image = Image.new("RGB", size, "#15171c")
    draw = ImageDraw.Draw(image)
    for y in range(h):  # a quiet vertical gradient
        shade = int(21 + 22 * y / h)
        draw.line([(0, y), (w, y)], fill=(shade, shade + 2, shade + 10))
    big, mid, small = (ImageFont.load_default(size=n) for n in (46, 26, 20))
    draw.text((32, 30), title, font=big, fill="#f2f2f2")
    draw.text((32, 92), subtitle, font=mid, fill="#9ecbff")
    draw.text((32, 132), facts, font=small, fill="#c8c8c8")
    # the profile's timeline: init, preprocess, encode, the steps (loading + inference), decode
    x, top, bottom = 32, 220, 290
    parts = [(0, 50), (1, 14), (2, 30)] + [(3 + i % 2, 10 if i % 2 == 0 else 26) for i in range(16)] + [(5, 70)]
    scale = (w - 64) / sum(n for _, n in parts)
    for colour, n in parts:
        draw.rectangle([x, top, x + n * scale - 2, bottom], fill=STAGE_COLOURS[colour])
        x += n * scale
    draw.text((32, 310), "profiled: time · memory · GPU activity per stage", font=small, fill="#e6e6e6")
    draw.text((32, 346), "ComfyUI-WanBench", font=small, fill="#7d8796")
    return image
