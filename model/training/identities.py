"""Pseudo-identities for training and judging the demo model: seeded variations of one public-domain face.

We train on no real person's photograph but scikit-image's astronaut (a NASA photograph in the public domain).
Variety comes from parameters, drawn from a seed per identity:

- **geometry**: the astronaut's 68-landmark mesh reshaped (eye distance and size, face width, chin, nose and
  mouth proportions, brow height; :class:`flashportrait.testing.FaceShape`) before the piecewise-affine warp;
- **appearance**, painted over each warped frame through masks that follow that frame's landmarks: skin tone
  (per-channel gains inside the face), hair colour (the dark pixels above the brows), glasses (rims and a bridge
  around the eyes, in a frame colour), background (a two-colour gradient with optional stripes outside the head),
  and a global brightness/contrast;
- **expressions**: seeded curves of mouth opening, smile/pout, blinks, brow raise, yaw/pitch/roll and a small
  head translation (:func:`expression_track`).

Identity 0 is the astronaut unchanged. Training identities are ``1 … n``; the held-out identities are drawn from
a disjoint seed range (:data:`HELD_OUT_FIRST`), so no held-out face is ever seen in training, whatever ``n``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from flashportrait.testing import ASTRONAUT_IOD, FaceShape, SyntheticExpression, expression_curves, render_warped_frame


HELD_OUT_FIRST = 1_000_000  # identity indices from here on are held out: never drawn for training
HELD_OUT_COUNT = 8
IDENTITY_SEED = 20261203  # mixes into every identity's generator


@dataclass(frozen=True)
class Appearance:
    """What a pseudo-identity changes on the warped astronaut's pixels (all neutral values leave them unchanged)."""

    skin_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel RGB gain inside the face
    hair_color: tuple[float, float, float] | None = None  # RGB the hair is recoloured to; None keeps it
    glasses: tuple[float, float, float] | None = None  # rim colour; None = no glasses
    background: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None  # gradient ends
    background_angle: float = 0.0  # radians: direction of the gradient
    stripes: float = 0.0  # 0 = plain gradient; else the stripe contrast in [0, 1]
    brightness: float = 0.0  # added to every pixel, in 0-255 units
    contrast: float = 1.0  # about mid-grey


@dataclass(frozen=True)
class PseudoIdentity:
    index: int
    shape: FaceShape
    appearance: Appearance

    @property
    def held_out(self) -> bool:
        return self.index >= HELD_OUT_FIRST


def pseudo_identity(index: int) -> PseudoIdentity:
    """The identity numbered ``index``: the same parameters on every machine (its own seeded generator)."""
    if index < 0:
        raise ValueError(f"identity index must be >= 0 (got {index})")
    if index == 0:
        return PseudoIdentity(0, FaceShape(), Appearance())
    rng = np.random.default_rng([IDENTITY_SEED, index])
    shape = FaceShape(
        eye_distance=rng.uniform(0.88, 1.14),
        face_width=rng.uniform(0.86, 1.16),
        chin_length=rng.uniform(0.8, 1.25),
        nose_length=rng.uniform(0.85, 1.2),
        mouth_width=rng.uniform(0.82, 1.2),
        eye_size=rng.uniform(0.85, 1.2),
        brow_height=rng.uniform(0.8, 1.3),
    )
    tone = rng.uniform(0.55, 1.25)  # darker to lighter skin, with a warm/cool tint
    tint = rng.uniform(-0.08, 0.08, size=3)
    appearance = Appearance(
        skin_gain=tuple(float(g) for g in np.clip(tone * (1.0 + tint), 0.4, 1.4)),
        hair_color=tuple(float(c) for c in rng.choice(_HAIR_COLOURS) * rng.uniform(0.8, 1.2)),
        glasses=tuple(float(c) for c in rng.uniform(0, 120, size=3)) if rng.random() < 0.3 else None,
        background=(tuple(float(c) for c in rng.uniform(0, 255, 3)), tuple(float(c) for c in rng.uniform(0, 255, 3)))
        if rng.random() < 0.85
        else None,
        background_angle=float(rng.uniform(0, 2 * np.pi)),
        stripes=float(rng.uniform(0.1, 0.4)) if rng.random() < 0.3 else 0.0,
        brightness=float(rng.uniform(-15, 15)),
        contrast=float(rng.uniform(0.85, 1.15)),
    )
    return PseudoIdentity(index, shape, appearance)


_HAIR_COLOURS = np.array(
    [(25, 20, 18), (60, 40, 25), (110, 75, 40), (170, 130, 80), (200, 170, 120), (120, 40, 20), (140, 140, 140)],
    dtype=np.float64,
)


def training_identities(count: int) -> list[PseudoIdentity]:
    """Identities 0 … count−1 (0 is the astronaut herself)."""
    if not 1 <= count < HELD_OUT_FIRST:
        raise ValueError(f"training identity count must be in [1, {HELD_OUT_FIRST}) (got {count})")
    return [pseudo_identity(i) for i in range(count)]


def held_out_identities(count: int = HELD_OUT_COUNT) -> list[PseudoIdentity]:
    """The fixed held-out identities used by every quality figure; disjoint from any training set."""
    return [pseudo_identity(HELD_OUT_FIRST + i) for i in range(count)]


# ---- expressions ------------------------------------------------------------------------------------------------


def expression_track(num_frames: int, *, seed: int, fps: float) -> SyntheticExpression:
    """Seeded curves of every expression parameter for one clip; mouth, blink, roll and yaw as the test videos have
    them (:func:`flashportrait.testing.expression_curves`), plus brow, smile, pitch and a small translation.

    The mouth is closed on a seeded share of frames (talking has pauses), so the model sees rest as well as motion.
    """
    base = expression_curves(num_frames, seed=seed, fps=fps, max_roll_deg=6.0, max_yaw_deg=10.0)
    rng = np.random.default_rng([IDENTITY_SEED, 7, seed])
    times = np.arange(num_frames) / fps

    def curve(low_hz: float, high_hz: float) -> np.ndarray:
        freqs, phases = rng.uniform(low_hz, high_hz, 2), rng.uniform(0, 2 * np.pi, 2)
        return np.sin(2 * np.pi * freqs[:, None] * times[None] + phases[:, None]).mean(0)

    pause = np.clip(curve(0.1, 0.4) * 3.0 + rng.uniform(-1.0, 2.0), 0.0, 1.0)  # 0 = mouth closed
    return SyntheticExpression(
        mouth_open=base.mouth_open * pause,
        blink=base.blink,
        roll_deg=base.roll_deg,
        yaw_deg=base.yaw_deg,
        brow=np.clip(curve(0.1, 0.6) * rng.uniform(0.3, 1.0), -1.0, 1.0),
        smile=np.clip(curve(0.1, 0.5) * rng.uniform(0.2, 1.0), -1.0, 1.0),
        pitch_deg=curve(0.1, 0.4) * rng.uniform(0.0, 6.0),
        shift_x=curve(0.05, 0.3) * rng.uniform(0.0, 0.15),
        shift_y=curve(0.05, 0.3) * rng.uniform(0.0, 0.1),
    )


# ---- rendering --------------------------------------------------------------------------------------------------


def render_identity_frame(identity: PseudoIdentity, size: int, **expression: float) -> np.ndarray:
    """One [size, size, 3] uint8 frame of ``identity`` making ``expression`` (render_warped_frame's keywords)."""
    frame, landmarks = render_warped_frame(**expression, size=size, face=identity.shape)
    return paint_appearance(frame, landmarks, identity.appearance)


def render_identity_clip(identity: PseudoIdentity, track: SyntheticExpression, size: int) -> Iterator[np.ndarray]:
    """The frames of ``track`` made by ``identity``, one at a time."""
    for parameters in track.frame_parameters():
        yield render_identity_frame(identity, size, **parameters)


def neutral_portrait(identity: PseudoIdentity, size: int) -> np.ndarray:
    """The identity at rest, facing the camera: the reference image of its clips."""
    return render_identity_frame(identity, size)


def paint_appearance(frame: np.ndarray, landmarks: np.ndarray, look: Appearance) -> np.ndarray:
    """Apply ``look`` to a warped frame whose 68 landmarks (frame pixels) are given: masks follow the face."""
    if look == Appearance():
        return frame
    image = frame.astype(np.float32)
    height, width = image.shape[:2]
    iod = float(np.linalg.norm(landmarks[42:48].mean(0) - landmarks[36:42].mean(0)))
    face, head = _face_masks(landmarks, iod, (height, width))
    if look.hair_color is not None:
        luminance = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        above_brows = np.clip((landmarks[17:27, 1].min() - np.arange(height)[:, None]) / (0.2 * iod), 0, 1)
        # Hair: the head above the brows that is not face and not the bright studio backdrop around the head.
        hair = head * (1 - face) * above_brows * np.clip((200 - luminance) / 40, 0, 1)
        shade = (luminance / 130.0)[..., None]  # keeps the strands' texture: dark strands stay dark
        recoloured = np.asarray(look.hair_color, dtype=np.float32) * np.clip(shade, 0.3, 1.6)
        image = image * (1 - hair[..., None]) + recoloured * hair[..., None]
    image = image * (1 + face[..., None] * (np.asarray(look.skin_gain, dtype=np.float32) - 1))
    if look.background is not None:
        image = _paint_background(image, head, look)
    if look.glasses is not None:
        image = _draw_glasses(image, landmarks, iod, look.glasses)
    image = (image - 127.5) * look.contrast + 127.5 + look.brightness
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _face_masks(landmarks: np.ndarray, iod: float, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Soft masks [H, W] in [0, 1]: the face (jaw contour closed over the raised brows) and the whole head."""
    height, width = shape
    forehead = landmarks[26:16:-1] - np.array([0.0, 0.5 * iod])
    face_polygon = np.concatenate([landmarks[0:17], forehead])
    face = np.zeros(shape, np.float32)
    cv2.fillPoly(face, [np.rint(face_polygon * 16).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=4)
    head = np.zeros(shape, np.float32)
    centre = landmarks[[0, 16, 8]].mean(0) - np.array([0.0, 0.55 * iod])
    axes = (0.62 * float(landmarks[16, 0] - landmarks[0, 0]) + 0.2 * iod, 2.0 * iod + 0.35 * iod)
    cv2.ellipse(
        head,
        (centre * 16).astype(int).tolist(),
        (np.array(axes) * 16).astype(int).tolist(),
        0,
        0,
        360,
        1.0,
        -1,
        lineType=cv2.LINE_AA,
        shift=4,
    )
    head = np.maximum(head, face)
    # The neck and shoulders below the chin stay part of the person, not the background.
    chin_row = landmarks[8, 1]
    neck = np.zeros(shape, np.float32)
    neck_half = 0.5 * float(landmarks[12, 0] - landmarks[4, 0])
    neck_x = float(landmarks[8, 0])
    cv2.rectangle(
        neck, (int(neck_x - neck_half), int(chin_row - 0.3 * iod)), (int(neck_x + neck_half), height), 1.0, -1
    )
    head = np.maximum(head, neck)
    blur = max(0.6, 0.06 * iod)
    return cv2.GaussianBlur(face, (0, 0), blur), cv2.GaussianBlur(head, (0, 0), blur)


def _paint_background(image: np.ndarray, head: np.ndarray, look: Appearance) -> np.ndarray:
    height, width = head.shape
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    direction = np.cos(look.background_angle) * xs + np.sin(look.background_angle) * ys
    ramp = (direction - direction.min()) / max(float(np.ptp(direction)), 1e-6)
    start, end = (np.asarray(c, dtype=np.float32) for c in look.background)
    background = start * (1 - ramp[..., None]) + end * ramp[..., None]
    if look.stripes:
        background *= 1 - look.stripes * (np.sin(direction * 2 * np.pi * 6) > 0)[..., None]
    return image * head[..., None] + background * (1 - head[..., None])


def _draw_glasses(image: np.ndarray, landmarks: np.ndarray, iod: float, colour: tuple[float, ...]) -> np.ndarray:
    """Two rims around the eyes and a bridge, anti-aliased, with the face's own motion."""
    thickness = max(1, round(0.07 * iod))
    canvas = np.ascontiguousarray(image)
    centres = [landmarks[36:42].mean(0), landmarks[42:48].mean(0)]
    axes = (round(0.36 * iod * 16), round(0.26 * iod * 16))
    for centre in centres:
        cv2.ellipse(
            canvas,
            np.rint(centre * 16).astype(int).tolist(),
            axes,
            0,
            0,
            360,
            tuple(colour),
            thickness,
            lineType=cv2.LINE_AA,
            shift=4,
        )
    inner = [centres[0] + np.array([0.36 * iod, 0.0]), centres[1] - np.array([0.36 * iod, 0.0])]
    cv2.line(
        canvas,
        np.rint(inner[0] * 16).astype(int).tolist(),
        np.rint(inner[1] * 16).astype(int).tolist(),
        tuple(colour),
        thickness,
        lineType=cv2.LINE_AA,
        shift=4,
    )
    return canvas


__all__ = [
    "ASTRONAUT_IOD",
    "HELD_OUT_COUNT",
    "HELD_OUT_FIRST",
    "Appearance",
    "PseudoIdentity",
    "expression_track",
    "held_out_identities",
    "neutral_portrait",
    "paint_appearance",
    "pseudo_identity",
    "render_identity_clip",
    "render_identity_frame",
    "training_identities",
]
