"""PD-FGC expression path end to end: tiny ONNX face models with the official input/output signatures (exported
here with torch.onnx.export), tiny PD-FGC weights in the official key layout, a synthetic portrait video."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flashportrait.model.checkpoints import CheckpointError
from flashportrait.model.expression import FEATURE_DIM, available_extractors, get_extractor
from flashportrait.model.expression.face_onnx import DET_INPUT_HW, DET_STRIDES, letterbox_matrix
from flashportrait.model.expression.pdfgc import (
    CROP_POINTS,
    CROP_SIZE,
    CROP_TEMPLATE,
    FanEncoder,
    FanEncoderConfig,
    load_fan_encoder,
    similarity_transform,
)
from flashportrait.testing import synthetic_driving_frames


FRAME = 256
FACE_HALF = 120  # the tiny detector's box: ±120 frame pixels around the centre (> the 96 px minimum face)


def face_template() -> np.ndarray:
    """222 points in the official grouping, in [0, 1]² with the extent the landmark crop keeps stable (0.85 of it,
    centred), so tracking from landmarks neither grows nor shrinks the face."""

    def ring(n, cx, cy, rx, ry, start=math.pi):
        angles = start + 2 * math.pi * np.arange(n) / n
        return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)

    chin = np.linspace(math.pi, 0, 33)
    parts = [
        np.stack([0.5 + 0.5 * np.cos(chin), 0.1 + 0.4 * np.sin(chin)], axis=1) * [1, 1] + [0, 0.0],  # contour 0-32
        np.stack([np.full(15, 0.5), np.linspace(-0.05, 0.2, 15)], axis=1),  # nose 33-47
        np.concatenate([ring(13, 0.3, -0.22, 0.12, 0.03), ring(13, 0.7, -0.22, 0.12, 0.03)]),  # brows 48-73
        ring(22, 0.3, -0.12, 0.1, 0.04),  # left eye 74-95 (74 = outer corner)
        ring(22, 0.7, -0.12, 0.1, 0.04),  # right eye 96-117 (96 = inner corner, same height → no roll)
        ring(64, 0.5, 0.3, 0.16, 0.07),  # mouth 118-181
        ring(20, 0.3, -0.12, 0.03, 0.03),  # left pupil 182-201
        ring(20, 0.7, -0.12, 0.03, 0.03),  # right pupil 202-221
    ]
    points = np.concatenate(parts)
    lo, hi = points.min(axis=0), points.max(axis=0)
    points = (points - (lo + hi) / 2) / (hi - lo).max()  # extent 1 on the long side, centred on 0
    return (0.5 + 0.85 * points).astype(np.float32)  # [222, 2]


class TinyFaceDetector(nn.Module):
    """[1, 3, 272, 160] → 3 score maps [1, N_s, 1] then 3 DFL box maps [1, N_s, 32]: a face at the frame centre."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        out_h, out_w = DET_INPUT_HW
        ratio = letterbox_matrix(FRAME, FRAME, out_w, out_h)[0, 0]
        distance = FACE_HALF * ratio  # in letterbox pixels
        scores, boxes = [], []
        for stride in DET_STRIDES:
            rows, cols = math.ceil(out_h / stride), out_w // stride
            score = torch.full((1, rows * cols, 1), -8.0)
            box = torch.zeros(1, rows * cols, 4, 8)
            if stride == 16:
                row, col = round(out_h / 2 / stride), round(out_w / 2 / stride)
                score[0, row * cols + col] = 6.0
                expectation = distance / stride  # DFL bins 0..7: put the mass on the two bins around it
                low = int(expectation)
                box[0, row * cols + col, :, low] = 30.0 + 10 * math.log(low + 1 - expectation + 1e-3)
                box[0, row * cols + col, :, low + 1] = 30.0 + 10 * math.log(expectation - low + 1e-3)
            scores.append(nn.Parameter(score))
            boxes.append(nn.Parameter(box.reshape(1, rows * cols, 32)))
        self.scores, self.boxes = nn.ParameterList(scores), nn.ParameterList(boxes)

    def forward(self, x):
        wobble = 0.01 * torch.tanh(self.conv(x).mean())
        return (*[torch.sigmoid(s + wobble) for s in self.scores], *[b + wobble for b in self.boxes])


class TinyLandmarks(nn.Module):
    """[1, 3, 128, 128] → landmarks [1, 444] (222 x then 222 y in [0, 1]), euler [1, 2], prob [1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.head = nn.Linear(4, 447)
        template = torch.from_numpy(face_template())
        self.register_buffer("template", torch.cat([template[:, 0], template[:, 1]])[None])

    def forward(self, x):
        out = self.head(self.conv(x).mean(dim=(2, 3)))  # [1, 447], depends on the crop's pixels
        landmarks = self.template + 0.004 * torch.tanh(out[:, :444])
        return landmarks, 0.05 * torch.tanh(out[:, 444:446]), torch.sigmoid(4.0 + out[:, 446:])


def export(module: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), str(path), input_names=["input"], output_names=outputs, dynamo=False
        )
    return path


def tiny_fan_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny FanEncoder (narrow trunk, the 554-d output layout) in the official ``pd_fpg.pth`` key layout."""
    torch.manual_seed(seed)
    encoder = FanEncoder(FanEncoderConfig(stem=8, mid=8, features=8, hourglass_depth=2, heatmaps=4))
    for name, tensor in encoder.state_dict().items():
        if name.endswith("running_var"):
            tensor.uniform_(0.5, 1.5)
        elif name.endswith("running_mean"):
            tensor.normal_(0, 0.1)
    return encoder.state_dict()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flashportrait")
    torch.manual_seed(0)
    export(
        TinyFaceDetector(),
        torch.zeros(1, 3, *DET_INPUT_HW),
        root / "face_det.onnx",
        [f"score_{s}" for s in DET_STRIDES] + [f"box_{s}" for s in DET_STRIDES],
    )
    export(TinyLandmarks(), torch.zeros(1, 3, 128, 128), root / "face_landmark.onnx", ["landmark", "euler", "prob"])
    torch.save(tiny_fan_state(), root / "pd_fpg.pth")
    return root


def test_pdfgc_is_registered():
    assert "pdfgc" in available_extractors()
    assert {"pixel", "landmark"} <= set(available_extractors())


def test_pdfgc_features_from_a_synthetic_portrait_video(model_dir):
    frames, truth = synthetic_driving_frames(5, FRAME, seed=1)
    extractor = get_extractor("pdfgc", model_dir=model_dir, batch_size=4)
    landmarks = extractor.landmarks_per_frame(frames)
    assert all(points is not None and points.shape == (222, 2) for points in landmarks)
    for points in landmarks:
        width, height = np.ptp(points, axis=0)
        # The tiny detector boxes ±120 px around the centre and the landmark model keeps the face's extent, so the
        # tracked face stays ~240-260 px wide, centred, through the 3 alignment passes and the smoothing.
        assert 200 < width < 300 and height > 96
        assert np.allclose((points.min(axis=0) + points.max(axis=0)) / 2, FRAME / 2, atol=12)
    features = extractor.extract(iter(frames))  # a one-shot stream
    assert features.shape == (5, FEATURE_DIM) and features.dtype == np.float32
    assert np.isfinite(features).all()
    # Different frames (mouth, blink, roll change) → different crops → different features.
    assert np.abs(np.diff(features, axis=0)).max() > 1e-4
    again = get_extractor("pdfgc", model_dir=model_dir, batch_size=2).extract(frames)
    assert np.allclose(features, again, atol=1e-5)  # batching does not change the result
    assert truth.mouth_open.shape == (5,)


def test_similarity_transform_recovers_a_known_similarity():
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    source = np.random.default_rng(0).uniform(0, 100, (5, 2))
    target = scale * source @ rotation.T + shift
    matrix = similarity_transform(source, target)
    assert np.allclose(matrix[:, :2], scale * rotation) and np.allclose(matrix[:, 2], shift)
    # The template itself maps onto itself scaled to the crop.
    points = np.zeros((222, 2))
    points[CROP_POINTS] = CROP_TEMPLATE * 50 + 10
    assert np.allclose(
        similarity_transform(points[CROP_POINTS], CROP_TEMPLATE * CROP_SIZE)[:, :2], np.eye(2) * CROP_SIZE / 50
    )


def test_fan_encoder_dimensions_come_from_the_checkpoint(model_dir):
    encoder = load_fan_encoder(model_dir / "pd_fpg.pth")
    assert encoder.config == FanEncoderConfig(stem=8, mid=8, features=8, hourglass_depth=2, heatmaps=4)
    assert encoder(torch.zeros(2, 3, CROP_SIZE, CROP_SIZE)).shape == (2, FEATURE_DIM)


def test_a_video_without_a_face_is_refused(model_dir, tmp_path):
    class NoFace(TinyFaceDetector):
        def forward(self, x):
            out = super().forward(x)
            return (*[score * 0 for score in out[:3]], *out[3:])

    export(
        NoFace(),
        torch.zeros(1, 3, *DET_INPUT_HW),
        tmp_path / "face_det.onnx",
        [f"score_{s}" for s in DET_STRIDES] + [f"box_{s}" for s in DET_STRIDES],
    )
    extractor = get_extractor(
        "pdfgc",
        det_model=tmp_path / "face_det.onnx",
        landmark_model=model_dir / "face_landmark.onnx",
        encoder=model_dir / "pd_fpg.pth",
    )
    frames, _ = synthetic_driving_frames(2, FRAME, seed=2)
    with pytest.raises(ValueError, match="no face was found in any frame"):
        extractor.extract(frames)


def test_pd_fpg_with_a_missing_key_is_refused(model_dir, tmp_path):
    state = torch.load(model_dir / "pd_fpg.pth", weights_only=True)
    del state["to_emo.3.weight"]
    torch.save(state, tmp_path / "pd_fpg.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(would stay random\): to_emo\.3\.weight"):
        load_fan_encoder(tmp_path / "pd_fpg.pth")
