"""Package a trained bundle for shipping: optional fp16 weights, provenance (command, source) in the metadata.

``python -m apr_training.package_model SRC.safetensors DST.safetensors [--fp16] [--command "..."]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from apr_localizer.checkpoints import load_model, save_model


def package(src: str | Path, dst: str | Path, fp16: bool = False, command: str | None = None) -> Path:
    """Re-save ``src`` (our format) as ``dst``, in fp16 if asked, recording how it was made.

    Everything the runtime reads is kept: scene names, preprocessing, uncertainty calibration, training camera and
    quaternion convention.
    """
    b = load_model(src)
    provenance = dict(b.provenance)
    provenance["packaged_from"] = str(src)
    if command:
        provenance["reproduce"] = command
    return save_model(
        dst,
        b.apr,
        b.iapr,
        b.pae,
        scene_names=b.scene_names,
        preprocess=b.preprocess,
        provenance=provenance,
        dtype=torch.float16 if fp16 else torch.float32,
        uncertainty=b.uncertainty,
        camera=b.camera,
        orientation=b.orientation,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="package_model", description=__doc__)
    p.add_argument("src", help="trained bundle (.safetensors, our format)")
    p.add_argument("dst", help="output bundle")
    p.add_argument("--fp16", action="store_true", help="store floating-point weights as float16 (half the size)")
    p.add_argument("--command", help="the command that reproduces the model, stored in its provenance")
    a = p.parse_args(argv)
    out = package(a.src, a.dst, a.fp16, a.command)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
