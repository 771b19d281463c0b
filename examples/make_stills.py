"""The README's still strips from the actual `make demo` output (run after `make demo`:
.venv/bin/python examples/make_stills.py [OUT_DIR]).

Per job of the sample manifest: one PNG with three rows — the reference portrait (as the model saw it: the
sidecar's crop box), the driving video's frames, and the output's frames at the same instants.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flashportrait.infra.video_io import iter_frames


HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "img"
COLUMNS = 6
TILE = 128


def _frames(path: Path) -> list[np.ndarray]:
    return list(iter_frames(str(path)))


def _tile(frame: np.ndarray) -> Image.Image:
    return Image.fromarray(frame).resize((TILE, TILE), Image.Resampling.LANCZOS)


def strip(reference: Path, driving: Path, output: Path, crop_box: list[int] | None) -> Image.Image:
    out_frames = _frames(output)
    drive_frames = _frames(driving)
    picks = np.linspace(0, len(out_frames) - 1, COLUMNS).round().astype(int)
    image = Image.open(reference).convert("RGB")
    if crop_box:
        image = image.crop(tuple(crop_box))
    canvas = Image.new("RGB", (TILE * (COLUMNS + 1), TILE * 2), "white")
    canvas.paste(image.resize((TILE, TILE), Image.Resampling.LANCZOS), (0, TILE // 2))
    for column, index in enumerate(picks, start=1):
        # Output frame k is driving frame k + 1 (the pipeline drops frame 0, the reconstructed reference).
        driving_index = min(index + 1 + (len(drive_frames) - len(out_frames) - 1), len(drive_frames) - 1)
        canvas.paste(_tile(drive_frames[max(driving_index, 0)]), (column * TILE, 0))
        canvas.paste(_tile(out_frames[index]), (column * TILE, TILE))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "reference", fill="black")
    draw.text((TILE + 4, 4), "driving", fill="white")
    draw.text((TILE + 4, TILE + 4), "output", fill="white")
    return canvas


def main(out_dir: str = "out/demo") -> None:
    out = Path(out_dir)
    rows = [json.loads(line) for line in (HERE / "manifest.jsonl").read_text().splitlines() if line.strip()]
    DOCS.mkdir(parents=True, exist_ok=True)
    for row in rows:
        video, sidecar = out / f"{row['id']}.mp4", out / f"{row['id']}.json"
        if not video.exists():
            raise FileNotFoundError(f"{video} is missing: run `make demo` first")
        crop = json.loads(sidecar.read_text())["result"]["extra"]["reference_crop_box"] if sidecar.exists() else None
        target = DOCS / f"demo-{row['id']}.png"
        strip(HERE / row["reference"], HERE / row["driving"], video, crop).save(target)
        print(target)


if __name__ == "__main__":
    main(*sys.argv[1:])
