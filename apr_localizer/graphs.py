"""The ONNX graph contract between the exporter and the runtimes: graph names, I/O names, shapes, dtypes and files.

Every graph has a fixed batch ``B`` (chosen at export) and single-file ONNX:

* ``apr`` (``apr.onnx``): ``image (B,3,H,W) float32, scene_override (B,) int64 -> pose (B,7), scene_log_probs (B,S),
  scene (B,) int64, latent_t (B,D), latent_rot (B,D)``; ``scene_override < 0`` selects the classifier's argmax;
* ``encoder`` (``encoder.onnx``): the same signature with the iAPR's own MS-Transformer (only when the iAPR does not
  share the APR's encoder);
* ``refine`` (``refine.onnx``): ``latent_t (B,D), latent_rot (B,D), pose (B,7), scene (B,) int64 -> refined_pose
  (B,7)``: one iAPR step (only when the model has an iAPR).

This module imports nothing from the package, so the exporter, the caches and every backend can depend on it.
"""

from __future__ import annotations

__all__ = [
    "APR_INPUTS",
    "APR_OUTPUTS",
    "GRAPH_FILES",
    "GRAPH_NAMES",
    "MANIFEST_NAME",
    "PARITY_NAME",
    "REFINE_INPUTS",
    "REFINE_OUTPUTS",
    "graph_io",
    "graph_signature",
]

APR_INPUTS = ("image", "scene_override")
APR_OUTPUTS = ("pose", "scene_log_probs", "scene", "latent_t", "latent_rot")
REFINE_INPUTS = ("latent_t", "latent_rot", "pose", "scene")
REFINE_OUTPUTS = ("refined_pose",)
GRAPH_NAMES = ("apr", "encoder", "refine")
GRAPH_FILES = {"apr": "apr.onnx", "encoder": "encoder.onnx", "refine": "refine.onnx"}
MANIFEST_NAME = "manifest.json"
PARITY_NAME = "parity.json"


def graph_io(graph: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of graph ``apr``, ``encoder`` or ``refine``; :class:`ValueError` for another name."""
    if graph in ("apr", "encoder"):
        return APR_INPUTS, APR_OUTPUTS
    if graph == "refine":
        return REFINE_INPUTS, REFINE_OUTPUTS
    raise ValueError(f"unknown graph '{graph}'; expected one of {', '.join(GRAPH_NAMES)}")


def graph_signature(
    graph: str, batch: int, size: int, num_scenes: int, hidden_dim: int
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name → (fixed shape, dtype name) of every input and output of ``graph`` (inputs first, in order)."""
    if graph in ("apr", "encoder"):
        return {
            "image": ((batch, 3, size, size), "float32"),
            "scene_override": ((batch,), "int64"),
            "pose": ((batch, 7), "float32"),
            "scene_log_probs": ((batch, num_scenes), "float32"),
            "scene": ((batch,), "int64"),
            "latent_t": ((batch, hidden_dim), "float32"),
            "latent_rot": ((batch, hidden_dim), "float32"),
        }
    graph_io(graph)  # raises for an unknown name
    return {
        "latent_t": ((batch, hidden_dim), "float32"),
        "latent_rot": ((batch, hidden_dim), "float32"),
        "pose": ((batch, 7), "float32"),
        "scene": ((batch,), "int64"),
        "refined_pose": ((batch, 7), "float32"),
    }
