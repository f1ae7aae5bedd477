"""Training loops: MS-Transformer, pose auto-encoder, iAPR, PoseNet and the PAE image decoder (``apr-train``).

:mod:`.config` holds the typed configuration, :mod:`.task` the run context and the :class:`Task` interface,
:mod:`.loop` the shared epoch loop (AMP, DDP, metrics), :mod:`.state` the resumable state and RNG,
:mod:`.distributed` devices, DDP and the epoch sampler, :mod:`.helpers` what the trainers share (transforms, label
reading, model loading, validation), one module per trainer, :mod:`.pipeline` ``apr-train pipeline`` (split by
sequence → every trainer → uncertainty calibration → the model file the node loads). The command line is
:mod:`apr_training.cli.train`.
"""

from __future__ import annotations
