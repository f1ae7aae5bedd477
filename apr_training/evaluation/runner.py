"""The one frame runner of the evaluators: any frame source → :meth:`Localizer.run_steps` → per-frame results.

For every frame the image is run through the APR graph **once** (scene = the classifier's argmax: the ground-truth
scene is withheld, batch 1), then ``N`` iAPR refinement steps on the cached image latents, keeping the estimate after
every step — exactly the loop the node runs (:meth:`apr_localizer.localizer.Localizer.run_steps`). One pass therefore
gives "MS-Transformer" (0 iterations) and "iAPR (k it.)" for k = 1..N, each with its own latency.

Frame sources: :class:`LabelSource` (a label CSV: images read from files, ground truth from the CSV; ``apr-eval``)
and :class:`BagSource` (a ROS 2 bag: images decoded from messages, ground truth matched by
:mod:`apr_training.bags.ground_truth`; ``apr-eval-bag offline``). Frames without ground truth are counted, never run.

Latency stages (ms): the source's ``load`` (file read + decode; not part of ``total``) or ``decode`` (message → RGB;
part of ``total``, as in the node), ``preprocess``, ``apr``, ``iapr`` (the iAPR's own encoder when it has one + k
refinement steps), ``postprocess``, ``total``. GPU stages are synchronised, so each stage's time is its own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from apr_localizer import uncertainty
from apr_localizer.localizer import Estimate, Localizer

from ..bags.ground_truth import GroundTruth
from ..bags.io import bag_topics, iter_images
from ..datasets.labels import LabelTable, validate_images
from . import metrics, robot

__all__ = [
    "BagSource",
    "EvalError",
    "EvalRun",
    "Frame",
    "FrameSource",
    "LabelSource",
    "build_report",
    "candidate_rows",
    "frame_uncertainty",
    "method_key",
    "method_name",
    "run_frames",
]


class EvalError(RuntimeError):
    """The evaluation cannot run (one sentence naming the file or option)."""


def method_name(k: int) -> str:
    """Display name of the estimate after ``k`` refinement iterations."""
    return "MS-Transformer" if k == 0 else f"iAPR ({k} it.)"


def method_key(k: int) -> str:
    """Short key (CSV columns, file names) of the estimate after ``k`` iterations: ``apr``, ``iapr1``, ..."""
    return "apr" if k == 0 else f"iapr{k}"


# --------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Frame:
    """One frame of a source.

    Its index (CSV row / image index on the topic), (H, W, 3) uint8 RGB, the time to load or decode it (ms), its ground
    truth ``(7,)`` (None: none within the tolerance), stamp (ns) and ground-truth offset (ms).
    """

    index: int
    rgb: np.ndarray
    load_ms: float
    gt: np.ndarray | None
    stamp_ns: int = 0
    gt_offset_ms: float = 0.0


class FrameSource(Protocol):
    """What :func:`run_frames` reads: frames in order, the name of their load stage and their expected count."""

    load_stage: str  # "load" (not part of the total latency) or "decode" (part of it)

    def __iter__(self) -> Iterator[Frame]: ...

    def __len__(self) -> int: ...


class LabelSource:
    """Frames of a label table: image files (read with ``load_rgb``) and the table's poses as ground truth.

    The ground truth is camera-to-world whatever the CSV's convention (:meth:`LabelTable.camera_to_world_pose`), like
    every :class:`~apr_localizer.localizer.Estimate`.
    """

    load_stage = "load"

    def __init__(self, table: LabelTable, rows: Sequence[int] | np.ndarray | None = None) -> None:
        self.table = table
        self.gt = table.camera_to_world_pose()
        self.rows = np.arange(len(table)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[Frame]:
        import time

        from ..datasets.torch_datasets import load_rgb

        for i, path in enumerate(validate_images(self.table)):
            t0 = time.perf_counter()
            try:
                rgb = load_rgb(path)
            except ValueError as e:
                raise EvalError(str(e)) from None
            yield Frame(int(self.rows[i]), rgb, (time.perf_counter() - t0) * 1e3, self.gt[i])


class BagSource:
    """Every ``stride``-th image of a bag topic (at most ``limit``), with ground truth matched by its stamp."""

    load_stage = "decode"

    def __init__(
        self, bag: str | Path, image_topic: str, ground_truth: GroundTruth, stride: int = 1, limit: int | None = None
    ) -> None:
        self.bag, self.image_topic, self.ground_truth = Path(bag), image_topic, ground_truth
        self.stride, self.limit = int(stride), limit

    def __len__(self) -> int:
        n = -(-bag_topics(self.bag).get(self.image_topic, ("", 0))[1] // self.stride)
        return min(n, self.limit) if self.limit is not None else n

    def __iter__(self) -> Iterator[Frame]:
        for im in iter_images(self.bag, self.image_topic, self.stride, self.limit):
            gt, offset_ms = self.ground_truth.lookup(im.stamp_ns)
            yield Frame(im.index, im.rgb, im.decode_ms, gt, im.stamp_ns, offset_ms)


# --------------------------------------------------------------------------------------------- the run
@dataclass
class EvalRun:
    """Per-frame results of :func:`run_frames` on ``N`` frames with ground truth and ``K`` refinement iterations.

    Attributes:
        index: ``(N,)`` frame index in its source; ``stamps_ns``: ``(N,)`` stamps (0 for label CSVs).
        gt: ``(N, 7)`` ground truth; ``gt_offset_ms``: ``(N,)`` distance to the ground-truth sample used.
        poses: ``(K+1, N, 7)`` estimate after ``k`` iterations (unit quaternion, ``w >= 0``; NaN when invalid).
        pred_scene: ``(N,)`` predicted scene id; ``confidence``: ``(N,)`` its probability.
        timings: stage → ``(N,)`` ms: ``load_stage``, ``preprocess``, ``apr``, ``encoder`` (0 unless the iAPR has its
            own MS-Transformer), ``step1..stepK``, ``postprocess``.
        frames_read: frames the source yielded; ``without_gt``: those skipped for lack of ground truth.
        table: the label rows of the frames (label sources only).
        score_name: the model's uncertainty score (its calibration's, else the default); ``scores``: ``(K+1, N)``
            that score per method (NaN where it cannot be computed); ``sigmas``: ``(K+1, N, 2)`` calibrated sigma
            (position m, orientation rad) per method, None when the model has no calibration.
        candidates: candidate score name → ``(K+1, N)`` (``run_frames(candidates=...)``); ``candidate_ms``: name →
            ``(N,)`` measured cost per frame (ms): computing the score from the loop's outputs, plus the PAE pass for
            ``pae_gap``.

    """

    index: np.ndarray
    stamps_ns: np.ndarray
    gt: np.ndarray
    gt_offset_ms: np.ndarray
    poses: np.ndarray
    pred_scene: np.ndarray
    confidence: np.ndarray
    timings: dict[str, np.ndarray]
    scene_names: list[str]
    iterations: int
    load_stage: str
    frames_read: int
    without_gt: int
    table: LabelTable | None = None
    info: dict[str, Any] = field(default_factory=dict)
    score_name: str = uncertainty.DEFAULT_SCORE
    scores: np.ndarray | None = None
    sigmas: np.ndarray | None = None
    candidates: dict[str, np.ndarray] = field(default_factory=dict)
    candidate_ms: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def pred_scene_names(self) -> list[str]:
        return [self.scene_names[i] if 0 <= i < len(self.scene_names) else str(i) for i in self.pred_scene.tolist()]

    def latency(self, k: int) -> dict[str, np.ndarray]:
        """Per-stage latency ``(N,)`` of the method with ``k`` iterations; ``total`` excludes ``load``."""
        t = self.timings
        out = {self.load_stage: t[self.load_stage], "preprocess": t["preprocess"], "apr": t["apr"]}
        if k > 0:
            out["iapr"] = t["encoder"] + sum(t[f"step{i}"] for i in range(1, k + 1))
        out["postprocess"] = t["postprocess"]
        total = out["preprocess"] + out["apr"] + out.get("iapr", 0.0) + out["postprocess"]
        out["total"] = total + (out["decode"] if self.load_stage == "decode" else 0.0)
        return out


def _candidate_costs(steps: list[Estimate], names: Sequence[str]) -> dict[str, float]:
    """Measured cost (ms) of each candidate score of one frame: the score from the loop's outputs (+ the PAE pass)."""
    import time

    poses = [e.pose for e in steps]
    conf = steps[-1].confidence
    pae = steps[-1].scores.get("pae_gap", float("nan"))
    costs = {}
    for name in names:
        t0 = time.perf_counter()
        uncertainty.score_frame(name, poses, conf, 1.0, pae)
        costs[name] = (time.perf_counter() - t0) * 1e3
    if "pae_gap" in costs:
        costs["pae_gap"] += float(steps[0].timings_ms.get("uncertainty", 0.0))
    return costs


def run_frames(
    localizer: Localizer,
    source: FrameSource,
    iterations: int,
    progress: bool = True,
    desc: str = "apr-eval",
    candidates: Sequence[str] = (),
) -> EvalRun:
    """Localize every frame of ``source`` that has ground truth with ``localizer.run_steps(rgb, iterations)``.

    ``candidates`` (names of :data:`apr_localizer.uncertainty.SCORES`) also records every candidate score of every
    method and its measured cost per frame (``run_steps(all_scores=True)``).
    """
    from tqdm import tqdm

    K = int(iterations)
    if K > 0 and localizer.bundle.iapr is None:
        raise EvalError(f"--iterations {K} needs an iAPR model; this model has none (use --iterations 0)")
    stages = [source.load_stage, "preprocess", "apr", "encoder", *(f"step{i}" for i in range(1, K + 1)), "postprocess"]
    timings: dict[str, list[float]] = {s: [] for s in stages}
    cols: dict[str, list] = {k: [] for k in ("index", "stamp", "gt", "offset", "scene", "conf")}
    per_method: dict[str, list[list[Any]]] = {k: [[] for _ in range(K + 1)] for k in ("pose", "score", "sigma")}
    cand: dict[str, list[list[float]]] = {c: [[] for _ in range(K + 1)] for c in candidates}
    cost: dict[str, list[float]] = {c: [] for c in candidates}
    read = without = 0
    bar = tqdm(total=len(source) or None, desc=desc, unit="frame", disable=not progress, file=sys.stderr)
    for frame in source:
        read += 1
        bar.update(1)
        if frame.gt is None:
            without += 1
            continue
        steps = localizer.run_steps(frame.rgb, K, all_scores=bool(candidates))
        t = steps[0].timings_ms
        timings[source.load_stage].append(frame.load_ms)
        for s in stages[1:]:
            timings[s].append(float(t.get(s, 0.0)))
        for k, est in enumerate(steps):
            per_method["pose"][k].append(est.pose)
            per_method["score"][k].append(est.score)
            per_method["sigma"][k].append((est.sigma_position_m, est.sigma_orientation_rad))
            for c in candidates:
                cand[c][k].append(est.scores.get(c, float("nan")))
        for c, ms in _candidate_costs(steps, candidates).items():
            cost[c].append(ms)
        for key, value in zip(
            cols, (frame.index, frame.stamp_ns, frame.gt, frame.gt_offset_ms, steps[0].scene_id, steps[0].confidence)
        ):
            cols[key].append(value)
    bar.close()
    if read == 0:
        raise EvalError(f"{getattr(source, 'bag', 'the label table')} has no frames to evaluate")
    n = len(cols["index"])
    cal = localizer.bundle.uncertainty
    sigmas = np.asarray(per_method["sigma"], dtype=np.float64).reshape(K + 1, n, 2) if cal is not None else None
    return EvalRun(
        index=np.asarray(cols["index"], dtype=np.int64),
        stamps_ns=np.asarray(cols["stamp"], dtype=np.int64),
        gt=np.asarray(cols["gt"], dtype=np.float64).reshape(n, 7),
        gt_offset_ms=np.asarray(cols["offset"], dtype=np.float64),
        poses=np.asarray(per_method["pose"], dtype=np.float64).reshape(K + 1, n, 7),
        pred_scene=np.asarray(cols["scene"], dtype=np.int64),
        confidence=np.asarray(cols["conf"], dtype=np.float64),
        timings={k: np.asarray(v, dtype=np.float64) for k, v in timings.items()},
        scene_names=list(localizer.scene_names),
        iterations=K,
        load_stage=source.load_stage,
        frames_read=read,
        without_gt=without,
        table=source.table if isinstance(source, LabelSource) else None,
        score_name=cal.score if cal is not None else uncertainty.DEFAULT_SCORE,
        scores=np.asarray(per_method["score"], dtype=np.float64).reshape(K + 1, n),
        sigmas=sigmas,
        candidates={c: np.asarray(v, dtype=np.float64).reshape(K + 1, n) for c, v in cand.items()},
        candidate_ms={c: np.asarray(v, dtype=np.float64) for c, v in cost.items()},
    )


def frame_uncertainty(run: EvalRun, k: int) -> robot.FrameUncertainty | None:
    """Return the model's score (and calibrated sigmas) of the method with ``k`` iterations; None when not recorded."""
    if run.scores is None:
        return None
    sig = run.sigmas
    return robot.FrameUncertainty(
        run.score_name, run.scores[k], None if sig is None else sig[k, :, 0], None if sig is None else sig[k, :, 1]
    )


def candidate_rows(run: EvalRun) -> list[dict[str, Any]]:
    """``uncertainty_candidates``: per candidate score, AUROC and coverage of every method, and its cost per frame."""
    per_method: dict[str, list[dict[str, Any]]] = {}
    for name, values in run.candidates.items():
        per_method[name] = []
        for k in range(run.iterations + 1):
            u = robot.robot_metrics(run.poses[k], run.gt, robot.FrameUncertainty(name, values[k])).uncertainty
            per_method[name].append(
                {
                    "method": method_name(k),
                    "auroc": u["auroc"],
                    "coverage_at_95_precision": u["coverage_at_95_precision"],
                }
            )
    cost = {n: float(np.mean(v)) if len(v) else float("nan") for n, v in run.candidate_ms.items()}
    return robot.candidates_summary(list(run.candidates), per_method, cost)


def build_report(
    run: EvalRun,
    info: dict[str, Any] | None = None,
    scenes: Sequence[str] | None = None,
    score_scenes: bool = True,
    thresholds=metrics.DEFAULT_THRESHOLDS,
) -> metrics.EvalReport:
    """One method per iteration count ``0..K``.

    ``scenes`` are the frames' true scenes (default: the label table's); ``score_scenes`` reports the scene
    classification accuracy against them. Label runs list scenes in model order.
    """
    true_scenes = list(scenes) if scenes is not None else list(run.table.scene if run.table is not None else [])
    order = run.scene_names if run.table is not None else None
    methods = [
        metrics.per_scene_metrics(
            run.poses[k],
            run.gt,
            true_scenes,
            run.pred_scene_names if score_scenes else None,
            run.latency(k),
            name=method_name(k),
            thresholds=thresholds,
            scene_order=order,
        )
        for k in range(run.iterations + 1)
    ]
    for k, m in enumerate(methods):
        r = robot.robot_metrics(run.poses[k], run.gt, frame_uncertainty(run, k))
        m.hint, m.uncertainty, m.risk_coverage = r.hint, r.uncertainty, r.risk_coverage
    return metrics.EvalReport(methods, dict(info or {}), candidate_rows(run) if run.candidates else [])
