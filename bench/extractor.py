"""Throughput and accuracy of the ``landmark`` expression extractor at 512×512, printed as JSON.

Input: a landmark-warped synthetic driving video of the astronaut (flashportrait.testing) with known mouth opening,
blinks, roll and yaw, so the same run reports how fast the extractor is and how well it follows the truth. Timings
exclude making the video and loading the models (reported separately); the median of ``--repeats`` runs is kept.

    .venv/bin/python bench/extractor.py [--frames 100] [--size 512] [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from flashportrait.model.expression.landmark import LandmarkExpressionExtractor, detect_faces, predict_landmarks
from flashportrait.model.expression.landmark_features import expression_features
from flashportrait.testing import warped_driving_frames


def _median_seconds(work, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(frames_count: int, size: int, repeats: int) -> dict[str, object]:
    frames, truth = warped_driving_frames(frames_count, size, seed=1, fps=25.0)
    started = time.perf_counter()
    predict_landmarks(frames[0], detect_faces(frames[0])[0])  # the first calls load the detector and predictor
    load_seconds = time.perf_counter() - started
    extractor = LandmarkExpressionExtractor()
    track = extractor.track(frames)
    track_s = _median_seconds(lambda: extractor.track(frames), repeats)
    features_s = _median_seconds(lambda: expression_features(track.landmarks, track.frame_size), repeats)
    box = detect_faces(frames[0])[0]
    detect_s = _median_seconds(lambda: detect_faces(frames[0]), repeats * 5)
    landmarks_s = _median_seconds(lambda: predict_landmarks(frames[0], box), repeats * 20)
    cnn_s = _median_seconds(lambda: detect_faces(frames[0], detector="cnn"), 1)
    features = extractor.extract(frames)
    roll_truth = truth.roll_deg - np.median(truth.roll_deg)
    return {
        "benchmark": "landmark expression extractor",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs (shared), no GPU",
        "frames": frames_count,
        "size": f"{size}x{size}",
        "model_load_s": round(load_seconds, 3),
        "frames_per_s": round(frames_count / (track_s + features_s), 1),
        "track_s": round(track_s, 3),
        "features_s": round(features_s, 3),
        "detections": track.detections,
        "per_call_ms": {
            "hog_detect_full_frame": round(detect_s * 1e3, 2),
            "cnn_detect_full_frame": round(cnn_s * 1e3, 1),
            "shape_predictor_68": round(landmarks_s * 1e3, 2),
        },
        "accuracy_vs_ground_truth": {
            "pearson_mouth_opening": round(float(np.corrcoef(features[:, 12], truth.mouth_open)[0, 1]), 4),
            "pearson_eye_open_left": round(float(np.corrcoef(features[:, 6], -truth.blink)[0, 1]), 4),
            "pearson_eye_open_right": round(float(np.corrcoef(features[:, 7], -truth.blink)[0, 1]), 4),
            "roll_max_error_deg": round(float(np.abs(np.degrees(features[:, 2]) - roll_truth).max()), 3),
            "pearson_yaw": round(float(np.corrcoef(features[:, 0], truth.yaw_deg)[0, 1]), 4),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = json.dumps(run(args.frames, args.size, args.repeats), indent=2)
    print(result)
    if args.out:
        args.out.write_text(result + "\n")


if __name__ == "__main__":
    main()
