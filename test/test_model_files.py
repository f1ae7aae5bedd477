"""Hostile and broken model files: bounded memory, one clear CheckpointError/ModelLoadError, crash-safe writes.

Each hostile file is refused before any weight memory is allocated (peak RSS growth measured in a fresh process), the
message is one line without control characters, and a writer SIGKILLed in the middle of ``save_model`` leaves the old
file intact and no temporary after the next save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from fuzz_support import REPO_ROOT, measure_in_subprocess, record, safetensors_bytes
from model_fixtures import random_ms_transformer

from apr_localizer.checkpoints import (
    METADATA_KEY,
    CheckpointError,
    load_model,
    load_official_checkpoint,
    save_model,
    to_official_state_dict,
)
from apr_localizer.localizer import Localizer, ModelLoadError
from apr_localizer.safetensors_io import read_safetensors_header

MB = 1024 * 1024


def _our_meta(**apr_config) -> dict:
    """apr_localizer metadata for a small MS-Transformer with ``apr_config`` overrides."""
    config = {"num_scenes": 2, "t_encoder_layers": 1, "t_decoder_layers": 1, "rot_encoder_layers": 1,
              "rot_decoder_layers": 1} | apr_config  # fmt: skip
    return {
        "format_version": 1,
        "components": {"apr": {"kind": "ms_transformer", "config": config}},
        "scene_names": ["a", "b"][: config["num_scenes"]] if isinstance(config["num_scenes"], int) else [],
    }


def _hostile_files(d: Path) -> dict[str, Path]:
    """Name → path of every hostile/broken model file (each a few KB at most)."""
    one = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    files: dict[str, bytes] = {
        "empty": b"",
        "short": b"\x01\x02\x03",
        "header_len_beyond_file": safetensors_bytes({"x": one}, bytes(4), declared_len=1 << 62),
        "header_len_7GB": safetensors_bytes(b"{}", bytes(100), declared_len=7 << 30),
        "header_not_json": safetensors_bytes(b"\xff\xfe not json"),
        "header_deeply_nested": safetensors_bytes(b"[" * 200_000 + b"]" * 200_000),
        "header_is_a_list": safetensors_bytes(b"[1, 2, 3]"),
        "unknown_dtype": safetensors_bytes({"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "negative_shape": safetensors_bytes({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
        "huge_shape": safetensors_bytes(
            {"x": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]}}, bytes(4)
        ),  # fmt: skip
        "offsets_beyond_data": safetensors_bytes(
            {"x": {"dtype": "U8", "shape": [1 << 33], "data_offsets": [0, 1 << 33]}}, bytes(8)
        ),  # fmt: skip
        "overlapping_tensors": safetensors_bytes(
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
        ),  # fmt: skip
        "metadata_not_strings": safetensors_bytes({"__metadata__": {METADATA_KEY: {"a": 1}}, "x": one}, bytes(4)),
        "metadata_bad_json": safetensors_bytes({"__metadata__": {METADATA_KEY: "{nope"}, "x": one}, bytes(4)),
        "metadata_ansi_escape": safetensors_bytes(
            {"__metadata__": {METADATA_KEY: json.dumps(_our_meta())}, "apr.\x1b[31mred\x1b[0m": one}, bytes(4)
        ),
        "huge_model_described": safetensors_bytes(
            {
                "__metadata__": {
                    METADATA_KEY: json.dumps(_our_meta(hidden_dim=65536, dim_feedforward=1 << 20, head_dim=1 << 20))
                },
                "x": one,
            },
            bytes(4),
        ),
        "billion_scenes": safetensors_bytes(
            {"__metadata__": {METADATA_KEY: json.dumps(_our_meta(num_scenes=10**9, per_scene_heads=True))}, "x": one},
            bytes(4),
        ),  # fmt: skip
        "billion_layers": safetensors_bytes(
            {"__metadata__": {METADATA_KEY: json.dumps(_our_meta(t_encoder_layers=10**9))}, "x": one}, bytes(4)
        ),
        "zero_heads": safetensors_bytes(
            {"__metadata__": {METADATA_KEY: json.dumps(_our_meta(nheads=0))}, "x": one}, bytes(4)
        ),
        "string_version": safetensors_bytes(
            {"__metadata__": {METADATA_KEY: json.dumps({**_our_meta(), "format_version": "1"})}, "x": one}, bytes(4)
        ),
        "scene_names_dict": safetensors_bytes(
            {"__metadata__": {METADATA_KEY: json.dumps({**_our_meta(), "scene_names": {"a": 1}})}, "x": one}, bytes(4)
        ),  # fmt: skip
        "components_list": safetensors_bytes(
            {"__metadata__": {METADATA_KEY: json.dumps({**_our_meta(), "components": [1]})}, "x": one}, bytes(4)
        ),
    }
    out = {}
    for name, data in files.items():
        path = d / f"{name}.safetensors"
        path.write_bytes(data)
        out[name] = path
    return out


def test_hostile_files_are_small(tmp_path: Path) -> None:
    sizes = {name: p.stat().st_size for name, p in _hostile_files(tmp_path).items()}
    assert max(v for k, v in sizes.items() if k != "header_deeply_nested") < 4096, sizes


def test_every_hostile_file_gives_one_clear_checkpoint_error(tmp_path: Path) -> None:
    for name, path in _hostile_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        msg = str(info.value)
        assert str(path) in msg, (name, msg)
        assert "\n" not in msg and "\x1b" not in msg and len(msg) < 600, (name, msg)
        with pytest.raises(ModelLoadError):  # the Python API's one error type
            Localizer.from_files(path)


def test_hostile_files_are_refused_without_allocating(tmp_path: Path) -> None:
    """Peak RSS growth while refusing each file, measured in a fresh process (imports excluded)."""
    paths = {name: str(p) for name, p in _hostile_files(tmp_path).items()}
    out = measure_in_subprocess(
        """
        for name, path in PATHS.items():
            try:
                load_model(path)
                result[name] = "loaded"
            except CheckpointError:
                result[name] = "CheckpointError"
            except BaseException as exc:
                result[name] = type(exc).__name__
        """,
        setup=f"from apr_localizer.checkpoints import CheckpointError, load_model\nPATHS = {paths!r}\n"
        "import apr_localizer.models, torch\n",
    )
    record("hostile model files", files=len(paths), peak_rss_growth_mb=out["growth_mb"], elapsed_s=out["elapsed_s"],
           results=out["result"])  # fmt: skip
    assert out["result"] == dict.fromkeys(paths, "CheckpointError"), out["result"]
    assert out["growth_mb"] < 100, out


def test_misshapen_official_checkpoints_give_checkpoint_errors(tmp_path: Path) -> None:
    sd = to_official_state_dict(random_ms_transformer(seed=0))
    cases = {
        "query_1d": {"query_embed_t.weight": torch.zeros(3)},  # was "tuple index out of range"
        "ffn_0d": {"transformer_t.encoder.layers.0.linear1.weight": torch.tensor(1.0)},
        "bad_layer_index": {"transformer_t.encoder.layers.x.linear1.weight": torch.zeros(2, 2)},
        "ansi_key": {"\x1b[2Jevil": torch.zeros(1)},
    }
    for name, patch in cases.items():
        broken = OrderedDict(sd)
        broken.update(patch)
        path = tmp_path / f"{name}.pth"
        torch.save(broken, path)
        with pytest.raises(CheckpointError) as info:
            load_official_checkpoint(path)
        assert "\x1b" not in str(info.value) and "\n" not in str(info.value), (name, str(info.value))


def _zip_bomb(path: Path, inflated: int) -> Path:
    """Write a torch.save archive whose tensor record is ``inflated`` bytes of deflated zeros (1 MB chunks)."""
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save({"query_embed_t.weight": torch.zeros(4)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(entry, "w", force_zip64=True) as f:
                    for _ in range(inflated // MB):
                        f.write(bytes(MB))
                continue
            dst.writestr(info, src.read(info.filename))
    return path


def test_compressed_torch_archive_is_refused_without_allocating(tmp_path: Path) -> None:
    import zipfile

    bomb = _zip_bomb(tmp_path / "bomb.pth", 300 * MB)
    assert bomb.stat().st_size < 2 * MB
    with zipfile.ZipFile(bomb) as z:  # the bomb is real: deflated entries that expand to 300 MB
        assert sum(i.file_size for i in z.infolist()) >= 300 * MB
    out = measure_in_subprocess(
        """
        try:
            load_official_checkpoint(PATH)
            result["outcome"] = "loaded"
        except CheckpointError as exc:
            result["outcome"] = "CheckpointError: " + str(exc)
        """,
        setup=f"from apr_localizer.checkpoints import CheckpointError, load_official_checkpoint\nPATH = {str(bomb)!r}",
    )
    record("zip-bomb official checkpoint", file_bytes=bomb.stat().st_size, peak_rss_growth_mb=out["growth_mb"])
    assert out["result"]["outcome"].startswith("CheckpointError") and "expand to" in out["result"]["outcome"], out
    assert out["growth_mb"] < 100, out


def test_valid_bundle_header_is_read_and_checked(tmp_path: Path) -> None:
    path = save_model(tmp_path / "ok.safetensors", random_ms_transformer(seed=1))
    infos, meta = read_safetensors_header(path)
    assert METADATA_KEY in meta and all(i.end - i.begin >= 0 for i in infos.values())
    assert load_model(path).apr.num_scenes == 3


# ------------------------------------------------------------------------------------------- crash-safe writes
_WRITER = """
import sys
sys.path[:0] = [{repo!r}, {test!r}]
from model_fixtures import random_ms_transformer
from apr_localizer.checkpoints import save_model
model = random_ms_transformer(seed=2)
print("ready", flush=True)
while True:
    save_model({path!r}, model)
"""


def _tmp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp"))


@pytest.mark.slow
def test_kill_during_model_write_keeps_the_old_file_and_cleans_the_temporary(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(path, random_ms_transformer(seed=1))
    old = path.read_bytes()
    code = _WRITER.format(repo=str(REPO_ROOT), test=str(REPO_ROOT / "test"), path=str(path))
    saw_orphan = False
    for _attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            # Kill as soon as a temporary exists, i.e. inside a write (not after a guessed delay, which depends on
            # the machine's load); a write that finishes first just means another attempt.
            deadline = time.monotonic() + 60.0
            while not _tmp_files(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.0005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # The destination is always a complete file: the old one or a complete new one.
        assert load_model(path).apr.num_scenes == 3
        saw_orphan |= bool(_tmp_files(tmp_path))
        if saw_orphan:
            break
    assert saw_orphan, "no kill landed inside a write (the test did not exercise the crash path)"
    # Loading keeps young temporaries (a writer may be busy); old ones and the next save remove them.
    for t in _tmp_files(tmp_path):
        os.utime(t, (time.time() - 3600, time.time() - 3600))
    load_model(path)
    assert _tmp_files(tmp_path) == []
    save_model(path, random_ms_transformer(seed=1))
    assert _tmp_files(tmp_path) == [] and path.read_bytes() == old


def test_loading_removes_old_temporaries_of_the_file_only(tmp_path: Path) -> None:
    path = tmp_path / "m.pth"
    torch.save(to_official_state_dict(random_ms_transformer(seed=0)), path)
    old, young, other = (tmp_path / ".m.pth.k1.tmp", tmp_path / ".m.pth.k2.tmp", tmp_path / ".n.pth.k3.tmp")
    for t in (old, young, other):
        t.write_bytes(b"partial")
    for t in (old, other):
        os.utime(t, (time.time() - 3600, time.time() - 3600))
    load_official_checkpoint(path)
    assert not old.exists() and young.exists() and other.exists()
