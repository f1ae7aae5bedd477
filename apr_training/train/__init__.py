"""Training loops: MS-Transformer, pose auto-encoder, iAPR, PoseNet and the PAE image decoder (``apr-train``).

:mod:`.config` holds the typed configuration, :mod:`.task` the run context and the :class:`Task` interface,
:mod:`.loop` the shared epoch loop (AMP, DDP, metrics), :mod:`.state` the resumable state and RNG,
:mod:`.distributed` devices, DDP and the epoch sampler, :mod:`.helpers` what the trainers share (transforms, label
reading, model loading, validation), one module per trainer, :mod:`.pipeline` ``apr-train pipeline`` (split by
sequence → every trainer → uncertainty calibration → the model file the node loads), and :mod:`.cli` the command line
(``main(argv) -> int``).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv=None) -> int:
    """Run ``apr-train`` with ``argv`` (see :func:`apr_training.train.cli.main`)."""
    from .cli import main as _main

    return _main(argv)
