"""Regenerate the sample inputs shipped in examples/ (run: .venv/bin/python examples/make_samples.py).

The portrait is scikit-image's astronaut (NASA, public domain); the driving clips are landmark-driven warps of it
with known mouth opening, blinks, head roll and yaw (flashportrait.testing), so no photo of a real person other
than that public-domain one is ever committed. ``reference_heldout.png`` is the first held-out pseudo-identity of
the demo model's training data (model/training/identities.py): a face the demo model never saw in training.
The talking clip carries a synthetic audio track (a tone whose loudness follows the mouth opening) so the demo
shows the driving audio muxed into the output.
"""

from __future__ import annotations

import json
import tempfile
import wave
from pathlib import Path

import numpy as np
from PIL import Image

from flashportrait.infra.video_io import encode_video
from flashportrait.model.training.identities import held_out_identities, neutral_portrait
from flashportrait.testing import astronaut_portrait, warped_driving_frames


HERE = Path(__file__).resolve().parent
FPS = 12.0
SAMPLE_RATE = 16000


def tone_following(mouth_open: np.ndarray, fps: float) -> np.ndarray:
    """A 220 Hz tone whose amplitude follows the mouth opening, frame by frame (int16 mono)."""
    samples_per_frame = int(SAMPLE_RATE / fps)
    envelope = np.repeat(mouth_open, samples_per_frame)
    t = np.arange(envelope.size) / SAMPLE_RATE
    return (0.6 * envelope * np.sin(2 * np.pi * 220.0 * t) * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.tobytes())
    return path


def main() -> None:
    Image.fromarray(astronaut_portrait(256)).save(HERE / "reference.png")
    Image.fromarray(neutral_portrait(held_out_identities(1)[0], 256)).save(HERE / "reference_heldout.png")
    clips = {"driving_talk.mp4": (61, 1, True), "driving_short.mp4": (17, 2, False)}  # frames, seed, audio
    for name, (frames, seed, audio) in clips.items():
        video, truth = warped_driving_frames(frames, 192, seed=seed, fps=FPS)
        with tempfile.TemporaryDirectory() as tmp:
            wav = write_wav(Path(tmp) / "tone.wav", tone_following(truth.mouth_open, FPS)) if audio else None
            encode_video(HERE / name, iter(video), FPS, crf=20, audio_source=wav)
    rows = [
        {
            "id": "astronaut-talk",
            "reference": "reference.png",
            "driving": "driving_talk.mp4",
            "prompt": "The astronaut is talking",
            "seed": 7,
        },
        {"id": "astronaut-short", "reference": "reference.png", "driving": "driving_short.mp4", "seed": 11},
        {
            "id": "heldout-talk",
            "reference": "reference_heldout.png",
            "driving": "driving_talk.mp4",
            "prompt": "a person talking",
            "seed": 5,
        },
    ]
    (HERE / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_lines = ["id,reference,driving,prompt,seed"] + [
        f'{r["id"]},{r["reference"]},{r["driving"]},"{r.get("prompt", "")}",{r["seed"]}' for r in rows
    ]
    (HERE / "manifest.csv").write_text("\n".join(csv_lines) + "\n")


if __name__ == "__main__":
    main()
