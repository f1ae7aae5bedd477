"""``apr-train``: train MS-Transformer, PAE, iAPR, PoseNet or the PAE image decoder.

Exit codes: 0 success, 1 invalid input (config, CSV, images, model files; one error line), 2 non-finite loss (the
last good checkpoint is kept) or a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

log = logging.getLogger("apr_training.train")

_DESCRIPTION = """\
Train a model of apr_localizer. Every trainer reads a label CSV
(scene,split,seq,img_path,t1,t2,t3,q1,q2,q3,q4; img_path relative to --data) and writes into --out:
  best.safetensors / last.safetensors   the model in apr_localizer's format (scene names, preprocessing, config)
  last_state.pt                          resumable state (--resume), loaded with torch.load(weights_only=True)
  metrics.jsonl, summary.json, config.yaml, checkpoints/epoch_NNNN.safetensors
Defaults come from config/training/<trainer default>.yaml; official JSON configs are accepted too.

trainers:
  ms-transformer  MS-Transformer (multi-scene APR): CameraPoseLoss (learned s_x/s_q) + scene NLL
  pae             pose auto-encoder distilled from a trained MS-Transformer or PoseNet (--teacher)
  iapr            iAPR relative pose regressor on image pairs (--pairs, or pairs generated from --labels)
  posenet         single-scene PoseNet baseline (efficientnet_b0 | mobilenet_v3_large | resnet50)
  decoder         PAE image decoder (64x64 reconstruction from a pose); --demo writes a GT/reconstruction grid
  pipeline        split by sequence -> MS-Transformer -> PAE -> iAPR -> calibration -> DIR/model.safetensors
                  (apr-train pipeline --data ROOT --labels CSV --out DIR [--time-budget MIN] [--resume]; -h for more)
"""

_EPILOG = """\
examples:
  apr-train ms-transformer --data /data/7Scenes --labels 7scenes_all_scenes.csv --out runs/ms7
  apr-train ms-transformer --config cambridge_finetune.yaml --init runs/cam/best.safetensors ... --out runs/cam_ft
  apr-train pae --teacher runs/ms7/best.safetensors --data /data/7Scenes --labels train.csv --out runs/pae7
  apr-train iapr --teacher runs/ms7/best.safetensors --pae runs/pae7/best.safetensors --labels train.csv ...
  apr-train ms-transformer --config synthetic --set optim.lr=3e-4 --max-steps 20 ...   (smoke run)
  torchrun --nproc_per_node 4 -m apr_training.cli.train ms-transformer ...            (DDP)
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``apr-train``."""
    from ..train.config import TRAINERS

    p = argparse.ArgumentParser(
        prog="apr-train",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trainer", choices=TRAINERS, help="what to train")
    io = p.add_argument_group("data and models")
    io.add_argument("--data", type=Path, help="dataset root the CSV image paths are relative to (default: CSV folder)")
    io.add_argument("--labels", type=Path, help="training label CSV")
    io.add_argument("--val-labels", type=Path, help="held-out label CSV evaluated after every run.val_every epochs")
    io.add_argument("--out", type=Path, required=True, help="output directory (created)")
    io.add_argument(
        "--config",
        help="YAML/JSON config: a path (official multi-model JSON: path#block) or a file name "
        "in config/training/ (e.g. synthetic), layered on the trainer's default config "
        "(7scenes_ms_transformer, 7scenes_pae, 7scenes_iapr, posenet or decoder .yaml)",
    )
    io.add_argument(
        "--pairs", type=Path, help="iapr: pairs CSV; default: pairs generated from --labels, saved as <out>/pairs.csv"
    )
    io.add_argument(
        "--teacher",
        type=Path,
        help="pae/iapr/decoder: trained MS-Transformer (.safetensors or official "
        ".pth); pae also accepts a PoseNet .safetensors",
    )
    io.add_argument(
        "--pae",
        type=Path,
        help="iapr/decoder: trained pose auto-encoder (a .safetensors bundle with a PAE, or an official .pth)",
    )
    io.add_argument(
        "--init",
        type=Path,
        help="initial weights: ms-transformer (e.g. the stage-1 model for cambridge_finetune.yaml), posenet, decoder",
    )
    io.add_argument(
        "--backbone-weights",
        help="model.backbone_weights: 'imagenet' (torchvision's ImageNet EfficientNet-B0, from the torch hub cache or "
        "downloaded) or a torchvision state_dict file; the matching backbone variant is chosen automatically",
    )
    run = p.add_argument_group("run control (override the config)")
    run.add_argument("--resume", action="store_true", help="continue from <out>/last_state.pt (config from the state)")
    run.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a previous run")
    run.add_argument("--epochs", type=int, help="optim.n_epochs")
    run.add_argument("--max-steps", type=int, help="stop after N optimiser steps in total (smoke runs)")
    run.add_argument("--batch-size", type=int, help="data.batch_size (per process under DDP)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="run.device (auto: CUDA when available)")
    run.add_argument("--workers", type=int, help="data.workers (DataLoader processes)")
    run.add_argument("--seed", type=int, help="run.seed for torch/python (numpy gets seed + 2; default 0 / 2)")
    run.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision on CUDA (run.amp; run.amp_dtype auto|float16|bfloat16)",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set optim.lr=3e-4 --set model.t_encoder_layers=2 (repeatable; "
        "official flat keys such as lr=... work too)",
    )
    run.add_argument(
        "--export-official",
        action="store_true",
        help="also write official-format checkpoints (raw state_dicts: model/pae/iapr_official.pth)",
    )
    run.add_argument("--demo", action="store_true", help="decoder: write <out>/decoder_demo.png (GT vs reconstruction)")
    run.add_argument(
        "--no-progress", action="store_true", help="no tqdm bars (log a line every run.n_freq_print steps)"
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _cli_overrides(args: argparse.Namespace) -> list[str]:
    items = []
    if args.epochs is not None:
        items.append(f"optim.n_epochs={args.epochs}")
    if getattr(args, "backbone_weights", None) is not None:
        items.append(f"model.backbone_weights={args.backbone_weights}")
    if args.max_steps is not None:
        items.append(f"run.max_steps={args.max_steps}")
    if args.batch_size is not None:
        items.append(f"data.batch_size={args.batch_size}")
    if args.device is not None:
        items.append(f"run.device={args.device}")
    if args.workers is not None:
        items.append(f"data.workers={args.workers}")
    if args.seed is not None:
        items += [f"run.seed={args.seed}", f"run.numpy_seed={args.seed + 2}"]
    if args.amp is not None:
        items.append(f"run.amp={'true' if args.amp else 'false'}")
    if args.no_progress:
        items.append("run.progress=false")
    return items


_OWN_FILES = ("last_state.pt", "metrics.jsonl", "summary.json", "config.yaml")
_MODEL_FILES = ("best.safetensors", "last.safetensors", "pairs.csv", "decoder_demo.png")


def _task_class(trainer: str):
    if trainer == "ms-transformer":
        from ..train.ms_transformer import MSTransformerTask

        return MSTransformerTask
    if trainer == "pae":
        from ..train.pae import PAETask

        return PAETask
    if trainer == "iapr":
        from ..train.iapr import IAPRTask

        return IAPRTask
    if trainer == "posenet":
        from ..train.posenet import PoseNetTask

        return PoseNetTask
    from ..train.decoder import DecoderTask

    return DecoderTask


def run_training(args: argparse.Namespace) -> int:
    """Run one training from parsed arguments; raises the errors :func:`main` turns into exit codes."""
    import torch
    import yaml

    from ..train.config import TrainConfig, apply_overrides, default_config_name, load_config
    from ..train.distributed import barrier, init_distributed
    from ..train.helpers import write_val_split
    from ..train.loop import Trainer
    from ..train.state import STATE_FILE, load_train_state, seed_everything
    from ..train.task import Context, Paths, TrainError

    out: Path = args.out
    notes: list[str] = []
    saved = None
    if args.resume:
        saved = load_train_state(out / STATE_FILE)
        if saved["trainer"] != args.trainer:
            raise TrainError(f"{out / STATE_FILE} is a {saved['trainer']} run, not {args.trainer}")
        if args.config:
            log.warning("--resume: the config stored in %s is used; --config %s is ignored", STATE_FILE, args.config)
        cfg = TrainConfig.from_dict(json.loads(saved["config"]), f"{out / STATE_FILE} (stored config)")
        cfg.run.max_steps = None  # a per-invocation limit: the resumed run goes on unless --max-steps is given again
        source = f"{out / STATE_FILE}"
    else:
        existing = [n for n in _OWN_FILES if (out / n).exists()]
        if existing and not args.overwrite:
            raise TrainError(
                f"--out {out} already holds a training run ({', '.join(existing)}); pass --resume to continue it, "
                "--overwrite to start afresh, or choose another --out"
            )
        cfg = load_config(args.config, args.trainer, notes)
        source = str(args.config) if args.config else f"config/training/{default_config_name(args.trainer)}"
    cfg = apply_overrides(cfg, list(args.set) + _cli_overrides(args))
    for n in notes:
        log.info("%s", n)
    dist_info, device = init_distributed(cfg.run.device)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume and args.overwrite:
            inputs = {Path(p).resolve() for p in (args.init, args.teacher, args.pae, args.pairs) if p is not None}
            for n in _OWN_FILES + _MODEL_FILES:  # a fresh run must not inherit the old best model
                if (out / n).resolve() not in inputs:
                    (out / n).unlink(missing_ok=True)
    if cfg.run.torch_threads > 0:
        torch.set_num_threads(cfg.run.torch_threads)
    seed_everything(cfg.run.seed + dist_info.rank, cfg.run.numpy_seed + dist_info.rank, cfg.run.deterministic)
    paths = Paths(out=out, labels=args.labels, data=args.data, pairs=args.pairs, teacher=args.teacher, pae=args.pae,
                  init=args.init, val_labels=args.val_labels)  # fmt: skip
    if args.resume and saved is not None:
        stored = json.loads(saved.get("inputs") or "{}")
        if paths.labels is None and stored.get("labels"):
            paths.labels = Path(stored["labels"])
        if paths.data is None and stored.get("data"):
            paths.data = Path(stored["data"])
    if paths.val_labels is None and paths.labels is not None and (cfg.data.val_sequences or cfg.data.val_fraction):
        if dist_info.is_main and Path(paths.labels).resolve() != (out / "split_train.csv").resolve():
            write_val_split(paths.labels, paths.data, out, cfg)  # (a resume may name the split itself: kept)
        barrier(dist_info)
        paths.data = paths.data or Path(paths.labels).resolve().parent
        paths.labels, paths.val_labels = out / "split_train.csv", out / "split_val.csv"
    ctx = Context(trainer=args.trainer, config=cfg, paths=paths, device=device, dist=dist_info, resume=args.resume,
                  export_official=args.export_official, demo=args.demo, config_source=source)  # fmt: skip
    task = _task_class(args.trainer)(ctx)
    stored_inputs = json.loads(saved.get("inputs") or "{}") if saved is not None else None
    task.setup(stored_inputs)
    task.inputs.setdefault("data", str(paths.data) if paths.data else None)
    task.inputs.setdefault("labels", str(paths.labels) if paths.labels else None)
    if dist_info.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        log.info("%s: %d training items, scenes %s, device %s%s", args.trainer, len(task.dataset), task.scene_names,
                 device, f", {dist_info.world_size} processes" if dist_info.enabled else "")  # fmt: skip
    result = Trainer(task).run(saved)
    if dist_info.is_main:
        log.info("done: %s after %d epochs / %d steps; files in %s", result.stopped, result.epochs, result.steps, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``apr-train``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pipeline"]:  # apr-train pipeline: every trainer, calibration and packaging (its own options)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("apr_training").setLevel(logging.INFO)
        from ..train.pipeline import pipeline_main

        return pipeline_main(argv[1:], main)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apr_training").setLevel(getattr(logging, args.log_level))
    from apr_localizer.checkpoints import CheckpointError
    from apr_training.datasets.labels import LabelError

    from ..train.config import ConfigError
    from ..train.task import NonFiniteLossError, TrainError

    try:
        return run_training(args)
    except NonFiniteLossError as e:
        print(f"apr-train: error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, TrainError, LabelError, CheckpointError, FileNotFoundError) as e:
        print(f"apr-train: error: {e}", file=sys.stderr)
        return 1
    finally:
        _shutdown_distributed()


def _shutdown_distributed() -> None:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # torchrun -m apr_training.cli.train ...
    sys.exit(main())
