"""Regenerate the sample inputs shipped in examples/ (run: .venv/bin/python examples/make_samples.py).

The portrait is scikit-image's astronaut (NASA, public domain); the driving clips are synthesised from it with
known mouth opening, blinks and head roll (flashportrait.testing), so no photo of a real person other than that
public-domain one is ever committed.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from flashportrait.infra.video_io import encode_video
from flashportrait.testing import astronaut_portrait, synthetic_driving_frames


HERE = Path(__file__).resolve().parent
FPS = 12.0


def main() -> None:
    Image.fromarray(astronaut_portrait(256)).save(HERE / "reference.png")
    clips = {"driving_talk.mp4": (61, 1), "driving_short.mp4": (17, 2)}  # frames, seed
    for name, (frames, seed) in clips.items():
        video, _ = synthetic_driving_frames(frames, 128, seed=seed, fps=FPS)
        encode_video(HERE / name, iter(video), FPS, crf=20)
    rows = [
        {
            "id": "astronaut-talk",
            "reference": "reference.png",
            "driving": "driving_talk.mp4",
            "prompt": "The astronaut is talking",
            "seed": 7,
        },
        {"id": "astronaut-short", "reference": "reference.png", "driving": "driving_short.mp4", "seed": 11},
    ]
    (HERE / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_lines = ["id,reference,driving,prompt,seed"] + [
        f'{r["id"]},{r["reference"]},{r["driving"]},"{r.get("prompt", "")}",{r["seed"]}' for r in rows
    ]
    (HERE / "manifest.csv").write_text("\n".join(csv_lines) + "\n")


if __name__ == "__main__":
    main()
