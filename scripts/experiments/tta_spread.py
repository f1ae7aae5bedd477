"""Experiment: the APR's spread under test-time augmentation as a "wrong estimate" score, against the others.

Runs a model on the held-out validation frames of an ``apr-train pipeline`` run: the full loop (APR + iAPR) on the
image as given, and the APR alone on K perturbed copies (crop shifts, zoom, brightness). Prints the AUROC for
"error > 0.5 m or > 10°" (of the final estimate) of the TTA spread next to the pipeline's candidate scores, and the
cost. Usage::

    python scripts/experiments/tta_spread.py MODEL PIPELINE_DIR DATA_ROOT [--frames 600] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np

from apr_localizer.geometry import pose_errors, rotation_error_deg
from apr_localizer.localizer import Localizer, LocalizerOptions
from apr_localizer.uncertainty import SCORES, auroc
from apr_training.datasets.labels import read_labels
from apr_training.datasets.torch_datasets import load_rgb


def perturbations(rgb: np.ndarray) -> list[np.ndarray]:
    """Four mild copies: shifted left/right by 4 % of the width, zoomed in 8 %, 25 % darker."""
    h, w = rgb.shape[:2]
    dx = int(round(0.04 * w))
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, 1.08)
    return [
        np.ascontiguousarray(np.pad(rgb[:, dx:], ((0, 0), (0, dx), (0, 0)), mode="edge")),
        np.ascontiguousarray(np.pad(rgb[:, :-dx], ((0, 0), (dx, 0), (0, 0)), mode="edge")),
        cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE),
        (rgb.astype(np.float32) * 0.75).astype(np.uint8),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("pipeline_dir")
    ap.add_argument("data_root")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    loc = Localizer.from_files(a.model, options=LocalizerOptions(backend="torch", device="cpu",
                                                                 iapr_iterations=a.iterations))  # fmt: skip
    val = read_labels(f"{a.pipeline_dir}/split_val.csv", dataset_root=a.data_root, scene_names=list(loc.scene_names))
    val = val.take(np.linspace(0, len(val) - 1, min(a.frames, len(val))).round().astype(int))
    gt = val.camera_to_world_pose().copy()
    gt[:, 3:] /= np.linalg.norm(gt[:, 3:], axis=1, keepdims=True)
    final, spread_t, spread_r, scores = [], [], [], {n: [] for n in SCORES}
    t_full = t_tta = 0.0
    for i in range(len(val)):
        rgb = load_rgb(val.image_path(i, a.data_root))
        t0 = time.perf_counter()
        ests = loc.run_steps(rgb, all_scores=True)
        t1 = time.perf_counter()
        aprs = [loc.localize(p, iterations=0).pose for p in perturbations(rgb)]
        t_tta += time.perf_counter() - t1
        t_full += t1 - t0
        final.append(ests[-1].pose)
        for n in SCORES:
            scores[n].append(ests[-1].scores.get(n, np.nan))
        ref = ests[0].pose
        spread_t.append(float(np.mean([np.linalg.norm(p[:3] - ref[:3]) for p in aprs])))
        spread_r.append(float(np.mean([rotation_error_deg(p[3:], ref[3:]) for p in aprs])))
    e_t, e_r = pose_errors(np.asarray(final), gt)
    wrong = (e_t > 0.5) | (e_r > 10.0)
    st, sr = np.asarray(spread_t), np.asarray(spread_r)
    out = {n: auroc(np.asarray(v, float), wrong) for n, v in scores.items()}
    out["tta_position_spread"] = auroc(st, wrong)
    out["tta_orientation_spread"] = auroc(sr, wrong)
    out["tta_spread"] = auroc(st / max(np.median(st), 1e-9) + sr / max(np.median(sr), 1e-9), wrong)
    report = {"frames": len(val), "wrong_fraction": float(wrong.mean()), "median_error_m": float(np.median(e_t)),
              "median_error_deg": float(np.median(e_r)), "auroc": out,
              "ms_per_frame": {"loop": 1e3 * t_full / len(val), "tta_4_apr": 1e3 * t_tta / len(val)},
              "spearman_spread_vs_error": float(np.corrcoef(np.argsort(np.argsort(st)),
                                                            np.argsort(np.argsort(e_t)))[0, 1])}  # fmt: skip
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
