"""Shared argparse groups of the console scripts and the one error-to-exit-code helper :func:`run_cli`.

Groups: model (``--model``, ``--iapr``, ``--pae``, ``--scene-names``), engine (``--backend``, ``--device``,
``--precision``, ``--threads``, ``--cache-dir``), ``--iterations`` and output (``--out``, ``--plane``,
``--no-plots``, ``--quiet``). Exit status convention: 0 success, 1 the run finished but failed, 2 bad input,
3 timeout, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence

from apr_localizer.backends.base import BACKENDS

__all__ = [
    "add_scores_arg",
    "parse_scores",
    "PRECISIONS",
    "add_engine_args",
    "add_iterations_arg",
    "add_model_args",
    "add_output_args",
    "run_cli",
    "scene_names",
]

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def add_model_args(p: argparse.ArgumentParser, scene_names: bool = True) -> None:
    """``--model`` (required), ``--iapr``, ``--pae`` and (official checkpoints) ``--scene-names``."""
    p.add_argument("--model", required=True, help="our model bundle (.safetensors) or an official APR/iAPR .pth")
    p.add_argument("--iapr", help="official iAPR checkpoint (.pth), refining the --model estimates")
    p.add_argument("--pae", help="official pose auto-encoder checkpoint (.pth), kept with the model")
    if scene_names:
        p.add_argument("--scene-names", help="comma-separated scene names for official checkpoints (model order)")


def add_engine_args(p: argparse.ArgumentParser, defaults: bool = True, what: str = "") -> None:
    """Engine options; ``defaults=False`` leaves every one unset (e.g. node parameters taken from parameter files)."""
    prefix = f"{what} " if what else ""
    p.add_argument(
        "--backend",
        default="auto" if defaults else None,
        choices=("auto", *BACKENDS),
        help=f"{prefix}inference engine" + (" (default: auto)" if defaults else " (unset: from the parameter files)"),
    )
    p.add_argument("--device", default="auto" if defaults else None, help=f"{prefix}device: auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32" if defaults else None, choices=PRECISIONS, help=f"{prefix}precision")
    p.add_argument(
        "--threads", type=int, default=0 if defaults else None, help=f"{prefix}CPU threads (0 = physical cores)"
    )
    p.add_argument("--cache-dir", help=f"{prefix}ONNX/TensorRT engine cache directory (default: the backend's)")


def add_iterations_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    """Add ``--iterations`` (iAPR refinement steps)."""
    p.add_argument("--iterations", type=int, help=help_text)


def add_scores_arg(p: argparse.ArgumentParser) -> None:
    """``--scores``: compare candidate uncertainty scores (parsed by :func:`parse_scores`)."""
    from apr_localizer.uncertainty import SCORES

    p.add_argument(
        "--scores",
        help="also compare candidate uncertainty scores: a comma-separated list of "
        f"{','.join(SCORES)} or 'all'; prints and writes (report.json uncertainty_candidates) each one's AUROC for "
        "'error > 0.5 m or > 10 deg', coverage at 95%% precision and measured cost per frame",
    )


def parse_scores(text: str | None) -> list[str]:
    """``--scores``: ``all`` or comma-separated names of :data:`apr_localizer.uncertainty.SCORES` (none: ``[]``)."""
    from apr_localizer.uncertainty import SCORES

    if not text:
        return []
    names = list(SCORES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in SCORES for n in names):
        raise ValueError(f"--scores {text!r}: expected 'all' or a comma-separated list of {', '.join(SCORES)}")
    return list(dict.fromkeys(names))


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``--out`` (required), ``--plane``, ``--no-plots``, ``--quiet``."""
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--plane",
        default="xy",
        choices=("xy", "xz", "yz", "auto"),
        help="trajectory plot plane; auto = the two widest ground-truth axes (default: xy)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress output and no printed table")


def scene_names(value: str | None) -> list[str] | None:
    """``--scene-names a,b,c`` → ``["a", "b", "c"]`` (None when unset)."""
    return [s.strip() for s in value.split(",")] if value else None


def run_cli(
    prog: str,
    body: Callable[[], int],
    errors: Mapping[type[BaseException], int] | Sequence[tuple[type[BaseException], int]],
) -> int:
    """Run ``body`` and turn the listed exceptions into ``prog: error: <message>`` and their exit codes.

    ``errors`` maps exception types to exit codes (first match wins; codes 3 print ``timeout`` instead of
    ``error``); ``KeyboardInterrupt`` gives 130.
    """
    pairs = list(errors.items()) if isinstance(errors, Mapping) else list(errors)
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:
        for kind, code in pairs:
            if isinstance(exc, kind):
                print(f"{prog}: {'timeout' if code == 3 else 'error'}: {exc}", file=sys.stderr)
                return code
        raise
