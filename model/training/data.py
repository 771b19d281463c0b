"""Training data for the demo model, generated here: pseudo-identities making seeded expressions, with the
expression features our own extractor reads from each clip — exactly what inference gives the model.

One clip per (identity, clip number): the identity's neutral portrait (the reference), ``frames`` RGB frames of it
making the seeded expressions of :func:`~.identities.expression_track`, the 554-d features the landmark extractor
reads from those frames (run on the whole clip, as on a whole driving video at inference, so its per-video neutral
statistics are the same kind), the rendered landmarks (for the loss's face/mouth weighting) and the ground-truth
curves. Clips are written one ``.npz`` each, so a build can stop and resume, and two processes can build in
parallel; ``dataset.json`` records the config that made them and a build with another config refuses the folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .identities import (
    PseudoIdentity,
    expression_track,
    held_out_identities,
    neutral_portrait,
    paint_appearance,
    training_identities,
)


logger = logging.getLogger(__name__)

DATASET_FILE = "dataset.json"
# Index of the mouth opening in the 554-d features: emotion block (after headpose 6 + eye 6), component 0.
MOUTH_OPENING_FEATURE = 12
TRUTH_CURVES = ("mouth_open", "blink", "roll_deg", "yaw_deg", "brow", "smile", "pitch_deg", "shift_x", "shift_y")


@dataclass(frozen=True)
class DataConfig:
    """How much data to make, at which size and frame rate (the demo preset's size and fps)."""

    identities: int = 240  # training identities (0 = the astronaut, then pseudo-identities)
    held_out: int = 8  # held-out identities, never trained on
    clips_per_identity: int = 1
    frames: int = 65  # RGB frames per clip (4k+1): 16 latent frames, several windows each
    size: int = 96
    fps: float = 12.0

    def __post_init__(self) -> None:
        if self.frames < 5 or (self.frames - 1) % 4:
            raise ValueError(f"data.frames must be 4k+1 >= 5 (got {self.frames}); e.g. 65")
        if self.size % 16:
            raise ValueError(f"data.size must be a multiple of 16 (got {self.size}); the VAE and patch need it")
        if self.identities < 1 or self.clips_per_identity < 1 or self.held_out < 0:
            raise ValueError("data.identities and data.clips_per_identity must be >= 1, data.held_out >= 0")


@dataclass(frozen=True)
class Clip:
    """One training or evaluation clip, in memory."""

    identity: int
    clip: int
    reference: np.ndarray  # [H, W, 3] uint8: the neutral portrait
    frames: np.ndarray  # [N, H, W, 3] uint8
    features: np.ndarray  # [N, 554] float32, from the landmark extractor on ``frames``
    landmarks: np.ndarray  # [N, 68, 2] float32, rendered (ground truth) positions in frame pixels
    truth: dict[str, np.ndarray]  # the expression curves, [N] each

    def feature_agreement(self) -> float:
        """Pearson r of the extracted mouth opening vs the rendered one; NaN when the mouth barely moves.

        dlib's landmarks fail on some pseudo-identities (glasses, most often: about one clip in five with glasses
        against one in thirty without), and features that miss the mouth teach the model nothing; the transformer
        stage skips clips below its ``min_feature_agreement``.
        """
        truth = self.truth["mouth_open"]
        mouth = self.features[:, MOUTH_OPENING_FEATURE]
        if truth.std() < 0.02 or mouth.std() < 1e-6:
            return float("nan")
        return float(np.corrcoef(truth, mouth)[0, 1])

    @classmethod
    def load(cls, path: Path) -> Clip:
        with np.load(path) as data:
            return cls(
                identity=int(data["identity"]),
                clip=int(data["clip"]),
                reference=data["reference"],
                frames=data["frames"],
                features=data["features"],
                landmarks=data["landmarks"],
                truth={name: data[name] for name in TRUTH_CURVES},
            )


def clip_seed(identity: int, clip: int) -> int:
    return identity * 1000 + clip


def render_clip(identity: PseudoIdentity, clip: int, config: DataConfig) -> Clip:
    """Render one clip and read its expression features with the landmark extractor (as inference does)."""
    from flashportrait.testing import render_warped_frame

    from ..expression import get_extractor

    track = expression_track(config.frames, seed=clip_seed(identity.index, clip), fps=config.fps)
    frames, landmarks = [], []
    for parameters in track.frame_parameters():
        frame, points = render_warped_frame(**parameters, size=config.size, face=identity.shape)
        frames.append(paint_appearance(frame, points, identity.appearance))
        landmarks.append(points.astype(np.float32))
    video = np.stack(frames)
    source = f"training clip {identity.index}/{clip}"
    features = get_extractor("landmark").extract(iter(video), source=source).astype(np.float32)
    truth = {name: np.asarray(getattr(track, name), dtype=np.float32) for name in TRUTH_CURVES}
    return Clip(
        identity.index, clip, neutral_portrait(identity, config.size), video, features, np.stack(landmarks), truth
    )


def _write_clip(args: tuple[PseudoIdentity, int, DataConfig, str]) -> str:
    identity, clip, config, path = args
    made = render_clip(identity, clip, config)
    partial = path + ".partial.npz"
    np.savez(
        partial,
        identity=made.identity,
        clip=made.clip,
        reference=made.reference,
        frames=made.frames,
        features=made.features,
        landmarks=made.landmarks,
        **made.truth,
    )
    os.replace(partial, path)  # a clip file exists whole or not at all: an interrupted build resumes cleanly
    return path


def clip_path(root: Path, identity: PseudoIdentity, clip: int) -> Path:
    split = "held_out" if identity.held_out else "train"
    return root / split / f"{identity.index:07d}-{clip:02d}.npz"


def build_dataset(
    config: DataConfig,
    root: str | Path,
    *,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Path], list[Path]]:
    """Make (or finish making) the dataset in ``root``: (training clip paths, held-out clip paths).

    Raises:
        ValueError: if ``root`` holds a dataset made with another config (delete it or choose another folder).
    """
    root = Path(root)
    _claim(root, config)
    jobs = [
        (identity, clip)
        for identity in training_identities(config.identities)
        for clip in range(config.clips_per_identity)
    ]
    jobs += [(identity, 0) for identity in held_out_identities(config.held_out)]
    todo = [
        (identity, clip, config, str(clip_path(root, identity, clip)))
        for identity, clip in jobs
        if not clip_path(root, identity, clip).exists()
    ]
    for split in ("train", "held_out"):
        (root / split).mkdir(parents=True, exist_ok=True)
    done = len(jobs) - len(todo)
    logger.info("dataset %s: %d clips present, %d to render", root, done, len(todo))
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            for _ in pool.map(_write_clip, todo, chunksize=1):
                done += 1
                if progress is not None:
                    progress(done, len(jobs))
    paths = [clip_path(root, identity, clip) for identity, clip in jobs]
    return [p for p in paths if p.parent.name == "train"], [p for p in paths if p.parent.name == "held_out"]


def _claim(root: Path, config: DataConfig) -> None:
    root.mkdir(parents=True, exist_ok=True)
    record = root / DATASET_FILE
    wanted = asdict(config)
    if record.exists():
        found = json.loads(record.read_text())
        if found != wanted:
            raise ValueError(
                f"{root} holds a dataset made with {found}, not {wanted}; delete the folder or set another data dir"
            )
        return
    record.write_text(json.dumps(wanted, indent=2))


def iter_clips(paths: list[Path]) -> Iterator[Clip]:
    for path in paths:
        yield Clip.load(path)
