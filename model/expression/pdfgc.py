"""PD-FGC expression features — what the released FlashPortrait transformer was trained on.

Reads like the method, top to bottom:

1. the FAN trunk (one hourglass) that turns a 224×224 aligned face into a 512-d feature (``pd_fpg.pth``'s ``model.``);
2. the disentangling heads: head pose (6), eye (6), emotion (30) and the 512-d mouth feature taken BEFORE its
   embedding layer, as the official pipeline does;
3. the crop: a similarity (Umeyama) from 5 landmarks (both pupils, nose, two mouth points) to a fixed template,
   warped to 224×224 with cubic interpolation, BGR→RGB, scaled to [-1, 1];
4. the extractor: ONNX face detection + 222 landmarks (``face_onnx``) → crop → FanEncoder, one 554-d vector per
   frame in the layout [headpose 6 | eye 6 | emotion 30 | mouth 512].

The widths are read from the checkpoint, so tiny test weights and the released ones share this code. Unlike the
official code, a frame without a face does not shift every later frame: it takes the nearest earlier face's
landmarks (or the first found face's for leading frames), so there is exactly one vector per frame.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError, Shape, TensorSource, empty_weights, load_into
from . import FEATURE_DIM
from .face_onnx import FaceDetector, LandmarkModel, track_landmarks


logger = logging.getLogger(__name__)

CROP_SIZE = 224
CROP_POINTS = [182, 202, 36, 149, 133]  # left pupil, right pupil, nose, two mouth points (222-point scheme)
CROP_TEMPLATE = np.array([[0.3843, 0.27], [0.62, 0.2668], [0.503, 0.4185], [0.406, 0.5273], [0.5977, 0.525]])


# 1. FAN trunk -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FanEncoderConfig:
    """Widths of the PD-FGC FanEncoder; the defaults are ``pd_fpg.pth``'s (9,035,727 weights)."""

    stem: int = 64
    mid: int = 128
    features: int = 256
    hourglass_depth: int = 4
    heatmaps: int = 68
    feature_dim: int = 512
    pose_dim: int = 6
    eye_dim: int = 6
    emotion_dim: int = 30
    mouth_embed_dim: int = 500


class ConvBlock(nn.Module):
    """Pre-activation residual block whose three 3×3 convs (c/2, c/4, c/4) are concatenated back to c channels."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        half, quarter = out_planes // 2, out_planes // 4
        self.bn1, self.conv1 = nn.BatchNorm2d(in_planes), nn.Conv2d(in_planes, half, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(half), nn.Conv2d(half, quarter, 3, padding=1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(quarter), nn.Conv2d(quarter, quarter, 3, padding=1, bias=False)
        self.downsample = None
        if in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_planes), nn.ReLU(True), nn.Conv2d(in_planes, out_planes, 1, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat([out1, out2, out3], dim=1) + residual


class HourGlass(nn.Module):
    """Recursive hourglass; modules are named ``b1_{level}``, ``b2_{level}``, ``b2_plus_1``, ``b3_{level}``."""

    def __init__(self, depth: int, features: int):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(features, features))
            self.add_module(f"b2_{level}", ConvBlock(features, features))
            if level == 1:
                self.add_module("b2_plus_1", ConvBlock(features, features))
            self.add_module(f"b3_{level}", ConvBlock(features, features))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = self._modules[f"b1_{level}"](x)  # dropout(0.5) of the original is inactive at inference
        lower = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        lower = self._level(level - 1, lower) if level > 1 else self._modules["b2_plus_1"](lower)
        lower = self._modules[f"b3_{level}"](lower)
        return upper + F.interpolate(lower, size=upper.shape[2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FanTrunk(nn.Module):
    """224×224 face → conv7×7/2 → blocks → hourglass → heatmaps → conv3×3/2 → 28×28 → Linear → feature."""

    def __init__(self, c: FanEncoderConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c.stem, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(c.stem)
        self.conv2 = ConvBlock(c.stem, c.mid)
        self.conv3 = ConvBlock(c.mid, c.mid)
        self.conv4 = ConvBlock(c.mid, c.features)
        self.m0 = HourGlass(c.hourglass_depth, c.features)
        self.top_m_0 = ConvBlock(c.features, c.features)
        self.conv_last0 = nn.Conv2d(c.features, c.features, 1)
        self.l0 = nn.Conv2d(c.features, c.heatmaps, 1)
        self.bn_end0 = nn.BatchNorm2d(c.features)
        self.conv6 = nn.Conv2d(c.heatmaps, 1, 3, 2, 1)
        self.fc = nn.Linear((CROP_SIZE // 8) ** 2, c.feature_dim)
        self.bn5 = nn.BatchNorm2d(c.heatmaps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # [B, stem, 112, 112]
        x = self.conv4(self.conv3(F.max_pool2d(self.conv2(x), 2)))  # [B, features, 56, 56]
        x = self.top_m_0(self.m0(x))
        heatmaps = self.l0(F.relu(self.bn_end0(self.conv_last0(x))))  # [B, heatmaps, 56, 56]
        x = self.conv6(F.relu(self.bn5(heatmaps)))  # [B, 1, 28, 28]
        return self.fc(F.relu(x.flatten(1)))  # [B, feature_dim]


# 2. Heads -----------------------------------------------------------------------------------------------------------
def _projection(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.BatchNorm1d(width), nn.Linear(width, width))


class FanEncoder(nn.Module):
    """PD-FGC: a face crop → (head pose, eye, emotion, mouth) features; keys equal ``pd_fpg.pth``'s."""

    def __init__(self, config: FanEncoderConfig | None = None):
        super().__init__()
        self.config = c = config or FanEncoderConfig()
        self.model = FanTrunk(c)
        self.to_mouth, self.to_headpose = _projection(c.feature_dim), _projection(c.feature_dim)
        self.to_eye, self.to_emo = _projection(c.feature_dim), _projection(c.feature_dim)
        self.mouth_embed = nn.Sequential(nn.ReLU(), nn.Linear(c.feature_dim, c.mouth_embed_dim))  # stored, unused
        self.headpose_embed = nn.Sequential(nn.ReLU(), nn.Linear(c.feature_dim, c.pose_dim))
        self.eye_embed = nn.Sequential(nn.ReLU(), nn.Linear(c.feature_dim, c.eye_dim))
        self.emo_embed = nn.Sequential(nn.ReLU(), nn.Linear(c.feature_dim, c.emotion_dim))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """faces [B, 3, 224, 224] RGB in [-1, 1] → [B, pose + eye + emotion + feature_dim] (554 for PD-FGC)."""
        x = self.model(faces)
        return torch.cat(
            [
                self.headpose_embed(self.to_headpose(x)),
                self.eye_embed(self.to_eye(x)),
                self.emo_embed(self.to_emo(x)),
                self.to_mouth(x),  # the mouth feature before its embedding, as the official pipeline uses it
            ],
            dim=1,
        )


def infer_fan_config(shapes: Mapping[str, Shape]) -> FanEncoderConfig:
    """FanEncoderConfig from ``pd_fpg.pth`` shapes."""

    def get(key: str) -> Shape:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the PD-FGC encoder dimensions: key {key!r} is missing")
        return shapes[key]

    depth = sum(1 for k in shapes if k.startswith("model.m0.b1_") and k.endswith(".conv1.weight"))
    return FanEncoderConfig(
        stem=get("model.conv1.weight")[0],
        mid=get("model.conv3.conv1.weight")[0] * 2,
        features=get("model.conv4.conv1.weight")[0] * 2,
        hourglass_depth=depth,
        heatmaps=get("model.l0.weight")[0],
        feature_dim=get("model.fc.weight")[0],
        pose_dim=get("headpose_embed.1.weight")[0],
        eye_dim=get("eye_embed.1.weight")[0],
        emotion_dim=get("emo_embed.1.weight")[0],
        mouth_embed_dim=get("mouth_embed.1.weight")[0],
    )


def load_fan_encoder(path: str | Path) -> FanEncoder:
    """``pd_fpg.pth`` → FanEncoder (fp32, eval), strictly: every key must match (the official load is non-strict)."""
    source = TensorSource.from_files([path])
    config = infer_fan_config(source.shapes)
    with empty_weights():
        encoder = FanEncoder(config)
    return load_into(encoder, source, "PD-FGC encoder", torch.float32)


# 3. Crop -------------------------------------------------------------------------------------------------------------
def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``source`` onto ``target`` (Umeyama
    1991), as a 2×3 matrix. Reflections are excluded by the sign correction of the SVD."""
    src_mean, dst_mean = source.mean(axis=0), target.mean(axis=0)
    src, dst = source - src_mean, target - dst_mean
    covariance = dst.T @ src / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(covariance) < 0:
        signs[-1] = -1
    rank = np.linalg.matrix_rank(covariance)
    if rank == 0:
        raise ValueError("the 5 crop landmarks coincide; no similarity transform exists")
    if rank == 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:
        rotation = u @ np.diag([1.0, -1.0]) @ vt
    elif rank == 1:
        rotation = u @ vt
    else:
        rotation = u @ np.diag(signs) @ vt
    scale = (singular @ signs) / src.var(axis=0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def crop_face(frame_bgr: np.ndarray, points: np.ndarray) -> torch.Tensor:
    """The PD-FGC input: the face warped onto the 5-point template at 224², RGB in [-1, 1], [3, 224, 224] fp32."""
    matrix = similarity_transform(points[CROP_POINTS].astype(np.float64), CROP_TEMPLATE * CROP_SIZE)
    warped = cv2.warpAffine(frame_bgr, matrix, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_CUBIC)
    rgb = cv2.cvtColor(warped, cv2.COLOR_BGR2RGB) / 255.0 * 2 - 1  # float64, as the official preprocessing
    return torch.from_numpy(rgb).permute(2, 0, 1).to(torch.float32)


# 4. Extractor -------------------------------------------------------------------------------------------------------
class PdfgcExpressionExtractor:
    """``pdfgc``: the released model's expression features from the FlashPortrait files.

    Args:
        model_dir: folder with ``face_det.onnx``, ``face_landmark.onnx`` and ``pd_fpg.pth`` (the FlashPortrait
            download); each may be overridden by its own argument.
        device: torch device for the PD-FGC encoder ("cpu", "cuda").
        providers: onnxruntime providers (default: CUDA if this onnxruntime has it, then CPU).
        batch_size: face crops per PD-FGC forward.
    """

    name = "pdfgc"

    def __init__(
        self,
        model_dir: str | Path | None = None,
        det_model: str | Path | None = None,
        landmark_model: str | Path | None = None,
        encoder: str | Path | None = None,
        device: str = "cpu",
        providers: list[str] | None = None,
        batch_size: int = 16,
    ):
        if model_dir is None and None in (det_model, landmark_model, encoder):
            raise ValueError("pdfgc extractor: give model_dir (the FlashPortrait folder) or all three model paths")
        root = Path(model_dir) if model_dir is not None else Path()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.detector = FaceDetector(det_model or root / "face_det.onnx", providers)
        self.landmarks = LandmarkModel(landmark_model or root / "face_landmark.onnx", providers)
        self.encoder = load_fan_encoder(encoder or root / "pd_fpg.pth").to(device)
        self.device, self.batch_size = device, batch_size

    def _bgr(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for index, frame in enumerate(frames):
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(
                    f"driving frame {index}: expected uint8 [H, W, 3] RGB, got {frame.dtype} {frame.shape}"
                )
            yield np.ascontiguousarray(frame[:, :, ::-1])

    def landmarks_per_frame(self, frames: Iterable[np.ndarray]) -> list[np.ndarray | None]:
        """Smoothed 222 landmarks per RGB frame (None where no face was found)."""
        return list(track_landmarks(self._bgr(frames), self.detector, self.landmarks))

    @torch.no_grad()
    def extract(self, frames: Iterable[np.ndarray], *, source: str = "the driving video") -> np.ndarray:
        """RGB uint8 frames → float32 [N, 554], streamed: frames are cropped as soon as their landmarks are known and
        encoded in batches (only frames before the first visible face wait for it)."""
        rows: list[torch.Tensor] = []
        crops: list[torch.Tensor] = []
        waiting: list[np.ndarray] = []
        last: np.ndarray | None = None
        missing = total = 0

        def flush() -> None:
            if crops:
                rows.append(self.encoder(torch.stack(crops).to(self.device)).float().cpu())
                crops.clear()

        def tracked() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
            def frames_seen() -> Iterator[np.ndarray]:
                for frame in self._bgr(frames):
                    current.append(frame)
                    yield frame

            current: list[np.ndarray] = []
            for points in track_landmarks(frames_seen(), self.detector, self.landmarks):
                yield current.pop(), points

        for frame, points in tracked():
            total += 1
            missing += points is None
            last = points if points is not None else last
            if last is None:
                waiting.append(frame)
                continue
            for earlier in waiting:  # leading frames without a face take the first face's landmarks
                crops.append(crop_face(earlier, last))
            waiting.clear()
            crops.append(crop_face(frame, last))
            if len(crops) >= self.batch_size:
                flush()
        if last is None:
            raise ValueError(
                "no face was found in any frame of the driving video; PD-FGC features need a visible face"
            )
        flush()
        if missing:
            logger.warning("no face in %d of %d driving frames; they reuse the nearest earlier face", missing, total)
        features = torch.cat(rows).numpy()
        if features.shape[1] != FEATURE_DIM:
            raise ValueError(f"PD-FGC encoder gives {features.shape[1]} features per frame, expected {FEATURE_DIM}")
        return features
