"""``apr-bench``: per-stage latency, throughput, memory and compute efficiency for every available backend.

Timing is measured, never asserted: every number comes from warmed-up runs in this process, interleaved in rounds
(so that background load hits every variant alike), and ratios are taken between variants of the same run.

Stages: decode (sensor encodings → RGB), preprocess (the shared test transform), APR graph, each iAPR iteration,
postprocess, and the end-to-end :meth:`Localizer.localize`. ``--seed-loop`` also times the original inference-loop
shape (the full MS-Transformer re-run in every iAPR iteration) on the same backend, so the saving is a ratio.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apr_localizer.backends.base import BACKENDS, BackendError, BackendOptions, create_backend
from apr_localizer.checkpoints import ModelBundle, load_bundle
from apr_localizer.imaging import decode_compressed, decode_raw, encode_compressed, encode_raw
from apr_localizer.localizer import Localizer, LocalizerOptions
from apr_localizer.models import IAPRConfig, MSTransformerConfig, build_iapr, build_ms_transformer, calibrate_batchnorm
from apr_localizer.preprocess import PreprocessConfig, preprocess

from .machine import cpu_peak_gflops, machine_info, physical_cores, time_runs

__all__ = ["ARCHS", "BenchOptions", "build_random_bundle", "format_table", "input_size", "run_benchmark", "summarize"]

log = logging.getLogger("apr_bench")

ARCHS: dict[str, dict[str, Any]] = {
    # the published 7-Scenes model of the PAE/iAPR repo (6+6 / 6+6), iAPR sharing the APR encoder
    "published": {"t": (6, 6), "rot": (6, 6), "scenes": 7, "rpr_ffn": 2048},
    # the MS repo's 7-Scenes config (rot 4+4)
    "published-rot4": {"t": (6, 6), "rot": (4, 4), "scenes": 7, "rpr_ffn": 2048},
    # the shallow demo-sized model
    "small": {"t": (2, 2), "rot": (2, 2), "scenes": 4, "rpr_ffn": 512},
}


# ------------------------------------------------------------------------------------------------ statistics
def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, p90, p99, mean, min and count of a list of milliseconds."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "n": int(a.size),
    }


def _interleaved(variants: dict[str, Callable[[], Any]], runs: int, rounds: int, warmup: int, sync) -> dict:
    """Time each variant in ``rounds`` interleaved rounds; return all samples and the best round's median."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
        sync()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    round_medians: dict[str, list[float]] = {k: [] for k in variants}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for k, fn in variants.items():
            s = time_runs(fn, per_round, sync)
            samples[k] += s
            round_medians[k].append(statistics.median(s))
    return {k: {**summarize(samples[k]), "best_round_median": min(round_medians[k])} for k in variants}


# ------------------------------------------------------------------------------------------------ models
def build_random_bundle(arch: str = "published", seed: int = 0) -> ModelBundle:
    """Build a random-weight bundle with realistic BatchNorm statistics (costs equal a trained model's)."""
    a = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = MSTransformerConfig(
        num_scenes=a["scenes"],
        t_encoder_layers=a["t"][0],
        t_decoder_layers=a["t"][1],
        rot_encoder_layers=a["rot"][0],
        rot_decoder_layers=a["rot"][1],
    )
    apr = build_ms_transformer(cfg)
    calibrate_batchnorm(apr, batches=2, batch_size=4, seed=seed)
    iapr = build_iapr(IAPRConfig(ms_transformer=cfg, rpr_dim_feedforward=a["rpr_ffn"]), mstransformer=apr).eval()
    return ModelBundle(apr=apr, iapr=iapr, provenance={"benchmark": f"random weights, architecture {arch}"})


def input_size(bundle: ModelBundle) -> int:
    """Return the square input size of the bundle's graphs (its preprocessing crop; the demo model's is 128 px)."""
    return int(bundle.preprocess.get("crop", 224))


def count_apr_flops(bundle: ModelBundle, size: int | None = None) -> float:
    """FLOPs of one APR forward at batch 1 (torch's flop counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = input_size(bundle) if size is None else size
    counter = FlopCounterMode(display=False)
    params = [p for p in bundle.apr.parameters() if p.requires_grad]
    for p in params:  # the counter's module tracker trips over parameters that require grad under no_grad
        p.requires_grad_(False)
    try:
        with torch.no_grad(), counter:
            bundle.apr(torch.zeros(1, 3, size, size))
    finally:
        for p in params:
            p.requires_grad_(True)
    return float(counter.get_total_flops())


def profile_torch_apr(bundle: ModelBundle, top: int = 12) -> list[dict[str, Any]]:
    """Top operators of the torch backend's APR forward on the CPU by self time."""
    from torch.profiler import ProfilerActivity, profile

    from apr_localizer.backends.torch_backend import TorchBackend

    apr = TorchBackend(bundle, BackendOptions(device="cpu")).apr  # what the torch backend runs: BN folded etc.
    size = input_size(bundle)
    x = torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            apr(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                apr(x)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
    return [
        {
            "op": e.key,
            "self_ms_per_run": e.self_cpu_time_total / 1e3 / 3,
            "share": e.self_cpu_time_total / total,
            "calls_per_run": e.count / 3,
        }
        for e in rows
    ]


# ------------------------------------------------------------------------------------------------ benchmark
def _sync_for(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def bench_decode(runs: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Decode + preprocess of a 640x480 frame in several sensor encodings."""
    rgb = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    variants: dict[str, Callable[[], Any]] = {}
    for enc in ("rgb8", "bgr8", "mono8", "yuv422"):
        data, step = encode_raw(rgb, enc)
        variants[f"decode {enc}"] = partial(decode_raw, data, enc, 640, 480, step)
    jpeg = encode_compressed(rgb, "jpeg", 90)
    variants["decode jpeg"] = lambda: decode_compressed(jpeg, "jpeg")
    for method in ("pil", "torch"):
        cfg = PreprocessConfig(method=method)
        variants[f"preprocess {method}"] = partial(preprocess, rgb, cfg)
    return _interleaved(variants, runs, rounds, warmup, lambda: None)


def bench_backend(
    bundle: ModelBundle,
    backend: str,
    precision: str,
    device: str,
    batch: int,
    iterations: int,
    runs: int,
    rounds: int,
    warmup: int,
    threads: int,
    seed_loop: bool,
    cache_dir: Path | None,
) -> dict[str, Any]:
    """Per-stage latency of one backend/precision/batch; ratios against the seed loop shape in the same run."""
    opts = BackendOptions(device=device, precision=precision, threads=threads, batch_size=batch, cache_dir=cache_dir)
    t0 = time.perf_counter()
    be = create_backend(bundle, backend, opts)
    setup_s = time.perf_counter() - t0
    sync = _sync_for(str(be.device))
    if str(be.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    size = input_size(bundle)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(be.device)
    out = be.run_apr(x)
    scene, pose = out["scene"], out["pose"]
    lt, lr = out["latent_t"], out["latent_rot"]
    if be.needs_encoder:
        lt, lr = be.run_encoder(x, scene)

    def refine_loop() -> torch.Tensor:
        return be.run_steps(x, iterations).pose  # THE inference loop (APR once, N refinement steps)

    def seed_style_loop() -> torch.Tensor:
        """Run the original loop shape: every iteration re-runs the full MS-Transformer (scene forced)."""
        p = be.run_apr(x)["pose"]
        for _ in range(iterations):
            o = (
                be.run_encoder(x, scene)
                if be.needs_encoder
                else (lambda r: (r["latent_t"], r["latent_rot"]))(be.run_apr(x, scene))
            )
            p = be.run_refine(o[0], o[1], p, scene)
        return p

    variants: dict[str, Callable[[], Any]] = {"apr graph": lambda: be.run_apr(x)}
    if be.has_refiner and iterations > 0:
        variants["iapr iteration"] = lambda: be.run_refine(lt, lr, pose, scene)
        if be.needs_encoder:
            variants["encoder graph"] = lambda: be.run_encoder(x, scene)
        variants[f"apr + {iterations} iapr"] = refine_loop
        if seed_loop:
            variants[f"seed loop: apr + {iterations} x (ms-transformer + iapr)"] = seed_style_loop
    timed = _interleaved(variants, runs, rounds, warmup, sync)
    result: dict[str, Any] = {
        "backend": be.name,
        "device": str(be.device),
        "precision": precision,
        "batch": batch,
        "setup_s": setup_s,
        "stages": timed,
        "throughput_img_s": batch / (timed["apr graph"]["median"] / 1e3),
        "selection": getattr(be, "selection_reason", "requested"),
    }
    key_ours, key_seed = f"apr + {iterations} iapr", f"seed loop: apr + {iterations} x (ms-transformer + iapr)"
    if key_ours in timed and key_seed in timed:
        result["ratio_vs_seed_loop"] = timed[key_ours]["median"] / timed[key_seed]["median"]
    if str(be.device).startswith("cuda"):
        result["gpu_peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    be.close()
    return result


def bench_end_to_end(
    bundle: ModelBundle, backend: str, device: str, iterations: int, runs: int, threads: int, cache_dir: Path | None
) -> dict[str, Any]:
    """Time Localizer.localize on a 640x480 RGB frame: its own per-stage timings (decode … postprocess)."""
    opts = LocalizerOptions(
        backend=backend,
        device=device,
        iapr_iterations=iterations,
        threads=threads,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    loc = Localizer(bundle, opts)
    rgb = np.random.default_rng(2).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    for _ in range(3):
        loc.localize(rgb)
    per_stage: dict[str, list[float]] = {}
    for _ in range(runs):
        est = loc.localize(rgb)
        for k, v in est.timings_ms.items():
            per_stage.setdefault(k, []).append(v)
    if not est.is_finite():
        raise RuntimeError("the localizer produced a non-finite estimate during the benchmark")
    loc.close()
    stages = {k: summarize(v) for k, v in per_stage.items()}
    return {"backend": loc.backend_name, "device": loc.device, "stages": stages}


def _available_backends(requested: list[str]) -> list[str]:
    return [b for b in requested if b in BACKENDS]


@dataclass
class BenchOptions:
    """What :func:`run_benchmark` measures (the ``apr-bench`` options)."""

    model: str | None = None
    iapr: str | None = None
    pae: str | None = None
    arch: str = "published"
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    device: str = "auto"
    iterations: int = 3
    runs: int = 30
    rounds: int = 3
    warmup: int = 3
    threads: int = 0
    seed_loop: bool = True
    end_to_end: bool = True
    flops: bool = True
    profile: bool = False
    cache_dir: str | None = None
    argv: list[str] = field(default_factory=list)


def run_benchmark(args: BenchOptions) -> dict[str, Any]:
    """Run everything the options ask for and return one JSON-serialisable report."""
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    if args.model:
        bundle = load_bundle(args.model, args.iapr, args.pae)
        model_desc = str(args.model)
    else:
        bundle = build_random_bundle(args.arch)
        model_desc = f"random weights, {args.arch} architecture"
    report: dict[str, Any] = {
        "command": " ".join(["apr-bench", *args.argv]),
        "machine": machine_info(),
        "model": model_desc,
        "model_config": bundle.apr.config.to_dict(),
        "input_size": input_size(bundle),
        "iterations": args.iterations,
        "threads": threads,
        "runs": args.runs,
        "rounds": args.rounds,
        "results": [],
        "skipped": [],
    }
    report["decode_preprocess"] = bench_decode(args.runs, args.rounds, args.warmup)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    _bench_variants(report, bundle, args, threads, cache_dir)
    ratios = _cross_backend_ratios(report["results"])
    if ratios:
        report["ratios"] = ratios
    if args.end_to_end:
        report["end_to_end"] = []
        for backend in _available_backends(args.backends):
            try:
                report["end_to_end"].append(
                    bench_end_to_end(bundle, backend, args.device, args.iterations, args.runs, threads, cache_dir)
                )
            except Exception as e:  # a backend that failed above fails here too; keep the report
                report["skipped"].append({"backend": backend, "stage": "end_to_end", "reason": str(e)[:200]})
    if args.flops:
        report["efficiency"] = _efficiency(bundle, threads, report["results"])
    if args.profile:
        report["profile_torch_apr"] = profile_torch_apr(bundle)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def _bench_variants(
    report: dict[str, Any], bundle: ModelBundle, args: BenchOptions, threads: int, cache_dir: Path | None
) -> None:
    """Every backend x precision x batch into ``report["results"]`` (or ``report["skipped"]`` with the reason)."""
    for backend in _available_backends(args.backends):
        for precision in args.precisions:
            for batch in args.batch_sizes:
                try:
                    res = bench_backend(
                        bundle,
                        backend,
                        precision,
                        args.device,
                        batch,
                        args.iterations,
                        args.runs,
                        args.rounds,
                        args.warmup,
                        threads,
                        args.seed_loop,
                        cache_dir,
                    )
                except (BackendError, ImportError, RuntimeError) as e:
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    report["skipped"].append(
                        {"backend": backend, "precision": precision, "batch": batch, "reason": msg}
                    )
                    log.info("skipped %s/%s/batch %d: %s", backend, precision, batch, msg)
                    continue
                report["results"].append(res)
                _print_progress(res)


def _efficiency(bundle: ModelBundle, threads: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    """APR FLOPs, the GEMM peak and each CPU backend's achieved GFLOP/s (batch 1, fp32)."""
    flops = count_apr_flops(bundle)
    peak = cpu_peak_gflops(threads)
    out: dict[str, Any] = {"apr_gflop": flops / 1e9, **peak}
    for res in results:
        if res["device"] == "cpu" and res["batch"] == 1 and res["precision"] == "fp32":
            achieved = flops / (res["stages"]["apr graph"]["median"] * 1e-3) / 1e9
            out[f"{res['backend']}_achieved_gflops"] = achieved
            out[f"{res['backend']}_fraction_of_gemm_peak"] = achieved / peak["gemm_gflops"]
    return out


def _cross_backend_ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    """ORT/torch (and TensorRT/torch) APR-graph ratios at equal device, precision, batch, from this run."""
    out = {}
    by_key = {(r["backend"], r["device"], r["precision"], r["batch"]): r for r in results}
    for (backend, device, precision, batch), r in by_key.items():
        base = by_key.get(("torch", device, precision, batch))
        if backend != "torch" and base:
            key = f"{backend}/torch apr graph ({device}, {precision}, batch {batch})"
            out[key] = r["stages"]["apr graph"]["median"] / base["stages"]["apr graph"]["median"]
    return out


# ------------------------------------------------------------------------------------------------ output
def _print_progress(res: dict[str, Any]) -> None:
    print(f"  done: {res['backend']}/{res['device']}/{res['precision']}/batch {res['batch']}", file=sys.stderr)


def format_table(report: dict[str, Any]) -> str:
    """Plain-text tables: decode/preprocess, per-backend stages, ratios, efficiency."""
    lines = [
        f"apr-bench — {report['machine']['cpu']}, {report['threads']} threads, torch {report['machine']['torch']},"
        f" onnxruntime {report['machine'].get('onnxruntime')}, model: {report['model']}, input "
        f"{report['input_size']} px",
        "",
    ]
    hdr = f"{'stage':58s} {'median':>9s} {'p90':>9s} {'p99':>9s} {'best rnd':>9s}"
    lines += ["decode + preprocess (640x480, ms)", hdr]
    for k, s in report["decode_preprocess"].items():
        lines.append(f"{k:58s} {s['median']:9.3f} {s['p90']:9.3f} {s['p99']:9.3f} {s['best_round_median']:9.3f}")
    for res in report["results"]:
        lines += [
            "",
            f"{res['backend']} on {res['device']}, {res['precision']}, batch {res['batch']} "
            f"(setup {res['setup_s']:.1f} s, {res['throughput_img_s']:.1f} img/s APR)",
            hdr,
        ]
        for k, s in res["stages"].items():
            lines.append(f"{k:58s} {s['median']:9.2f} {s['p90']:9.2f} {s['p99']:9.2f} {s['best_round_median']:9.2f}")
        if "ratio_vs_seed_loop" in res:
            lines.append(f"{'ratio ours / seed loop (medians, same run)':58s} {res['ratio_vs_seed_loop']:9.3f}")
    for k, v in report.get("ratios", {}).items():
        lines.append(f"ratio {k}: {v:.3f}")
    for e in report.get("end_to_end", []):
        lines += ["", f"end to end Localizer.localize ({e['backend']}/{e['device']}), ms", hdr]
        for k, s in e["stages"].items():
            lines.append(f"{k:58s} {s['median']:9.3f} {s['p90']:9.3f} {s['p99']:9.3f} {'':>9s}")
    if "efficiency" in report:
        lines += ["", "compute efficiency (APR graph, batch 1, fp32, CPU)"]
        lines += [f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in report["efficiency"].items()]
    if report.get("profile_torch_apr"):
        lines += ["", "top torch operators in the APR graph (self time per run)"]
        lines += [
            f"  {r['op']:40s} {r['self_ms_per_run']:8.2f} ms {100 * r['share']:5.1f} %"
            for r in report["profile_torch_apr"]
        ]
    for s in report["skipped"]:
        lines.append(f"skipped {s}")
    lines.append(f"peak RSS {report['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
