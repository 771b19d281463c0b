"""A small Pareto plot written with Pillow (no plotting dependency): fidelity against cost, one colour per family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
    (255, 187, 120),
    (152, 223, 138),
    (197, 176, 213),
    (158, 218, 229),
]
Curve = Sequence[tuple[float, float]]  # (x, y) points


@dataclass(frozen=True)
class _Axes:
    left: float
    top: float
    right: float
    bottom: float
    x_min: float
    x_max: float
    y_min: float
    y_max: float

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        return (
            self.left + (x - self.x_min) / (self.x_max - self.x_min) * (self.right - self.left),
            self.bottom - (y - self.y_min) / (self.y_max - self.y_min) * (self.bottom - self.top),
        )


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def pareto_plot(
    panels: Sequence[tuple[str, Mapping[str, Curve], Mapping[str, Curve]]],
    path: Path,
    x_label: str,
    y_label: str,
    marks: Sequence[float] = (),
) -> None:
    """One panel per (title, frontier lines by family, all points by family); vertical guides at ``marks``."""
    width, height, margin = 760, 560, (70, 30, 40, 60)  # left, top, right, bottom
    image = Image.new("RGB", (width * len(panels), height + 170), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    families = sorted({f for _, lines, points in panels for f in (*lines, *points)})
    colour = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(families)}
    for index, (title, lines, points) in enumerate(panels):
        x0 = index * width
        xs = [x for curve in points.values() for x, _ in curve] or [0.0, 1.0]
        ys = [y for curve in points.values() for _, y in curve] or [0.0, 1.0]
        x_min, x_max = 0.0, max(xs) * 1.05
        y_min, y_max = min(ys) - 1.0, max(ys) + 1.0
        left, top = x0 + margin[0], margin[1]
        right, bottom = x0 + width - margin[2], height - margin[3]
        to_px = _Axes(left, top, right, bottom, x_min, x_max, y_min, y_max).to_px

        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left + 60, 6), title, fill="black", font=font)
        for i in range(6):
            xv, yv = x_min + i * (x_max - x_min) / 5, y_min + i * (y_max - y_min) / 5
            px, _ = to_px(xv, y_min)
            _, py = to_px(x_min, yv)
            draw.line([px, bottom, px, bottom + 5], fill="black")
            draw.text((px - 10, bottom + 8), f"{xv:.1f}", fill="black", font=small)
            draw.line([left - 5, py, left, py], fill="black")
            draw.text((left - 45, py - 7), f"{yv:.1f}", fill="black", font=small)
        for mark in marks:
            if x_min < mark < x_max:
                px, _ = to_px(mark, y_min)
                draw.line([px, top, px, bottom], fill=(200, 200, 200))
        draw.text(((left + right) / 2 - 120, bottom + 28), x_label, fill="black", font=font)
        draw.text((x0 + 4, 8), y_label, fill="black", font=small)
        for family, curve in lines.items():
            pts = [to_px(x, y) for x, y in sorted(curve)]
            if len(pts) > 1:
                draw.line(pts, fill=colour[family], width=2)
        for family, curve in points.items():
            for x, y in curve:
                px, py = to_px(x, y)
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour[family])
    columns = max(1, image.width // 300)
    for i, family in enumerate(families):  # legend under the panels
        lx, ly = 20 + (i % columns) * 300, height + 10 + (i // columns) * 22
        draw.rectangle([lx, ly + 3, lx + 14, ly + 13], fill=colour[family])
        draw.text((lx + 20, ly), family, fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
