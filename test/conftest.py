"""Session-wide ROS 2 environment guard and shared fixtures.

At import time (before any test module can import rclpy) this sets the environment that every process importing
rclpy must have, so that subprocesses inherit it: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (forced), a private
ROS_DOMAIN_ID, a temporary ROS_LOG_DIR, AMENT_PREFIX_PATH and the Fast DDS SHM profile. scripts/run_tests.sh sets the
same variables; this makes a bare ``python -m pytest`` safe as well.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apr_training.ros_harness import prepare_ros_environment, subprocess_env

REPO_ROOT = Path(__file__).resolve().parents[1]
FASTDDS_PROFILE = REPO_ROOT / "config" / "fastdds_shm_big.xml"

_created_log_dir: str | None = None


def _apply_ros_env_defaults() -> None:
    """Force LOCALHOST discovery and fill in the other mandatory ROS variables (kept when already valid)."""
    global _created_log_dir
    if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") not in (None, "LOCALHOST"):
        warnings.warn(
            f"ROS_AUTOMATIC_DISCOVERY_RANGE={os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE']} replaced by LOCALHOST: "
            "tests must not send DDS traffic off the machine.",
            stacklevel=2,
        )
    changed = prepare_ros_environment(fastdds_profile=FASTDDS_PROFILE)  # the tools' policy (apr_training.ros_harness)
    _created_log_dir = changed.get("ROS_LOG_DIR")
    if os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") != "rmw_fastrtps_cpp":
        del os.environ["RMW_IMPLEMENTATION"]  # only Fast DDS exists in the PyPI wheels


_apply_ros_env_defaults()
# Exported ONNX files and TensorRT engines of test runs go to a per-session temp dir, never the user's cache.
os.environ.setdefault("APR_LOCALIZER_CACHE_DIR", tempfile.mkdtemp(prefix="apr_cache_"))


def pytest_report_header(config: pytest.Config) -> str:
    """Show the ROS environment of this run."""
    return (
        f"ROS: ROS_AUTOMATIC_DISCOVERY_RANGE={os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE']} "
        f"ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} ROS_LOG_DIR={os.environ['ROS_LOG_DIR']}"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the ROS log dir this conftest created (run_tests.sh manages its own)."""
    if _created_log_dir:
        shutil.rmtree(_created_log_dir, ignore_errors=True)


def _check_discovery_range(culprit: str) -> None:
    if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
        value = os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "<unset>")
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        pytest.fail(f"{culprit} set ROS_AUTOMATIC_DISCOVERY_RANGE={value}; it must stay LOCALHOST.", pytrace=False)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before every test: the discovery range must still be LOCALHOST (e.g. after module imports)."""
    _check_discovery_range("code run before this test")


@pytest.fixture(autouse=True)
def _discovery_range_guard() -> Iterator[None]:
    """After every test: fail the test that changed the discovery range (error at teardown) and restore LOCALHOST."""
    yield
    _check_discovery_range("this test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests that start ROS processes ``ros``; skip ``gpu`` tests unless CUDA is available.

    A test that uses the ``ros_env`` or ``rclpy_context`` fixture starts rclpy processes or a context, so it belongs to
    the ROS tier (``make test-ros``) even without an explicit marker; ``make test-unit`` deselects it.
    """
    for item in items:
        if {"ros_env", "rclpy_context"} & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("ros"):
            item.add_marker(pytest.mark.ros)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken CUDA runtime
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Root of the repository checkout."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Parity reference data: $APR_SHARED_DIR/reference, else <repo>/../shared/reference.

    Skips when it is missing, unless APR_REQUIRE_REFERENCE=1 (set by .ci/run), where a missing directory fails.
    """
    shared = os.environ.get("APR_SHARED_DIR")
    path = (Path(shared) if shared else REPO_ROOT.parent / "shared") / "reference"
    if not path.is_dir():
        msg = f"parity reference data not found at {path} (set APR_SHARED_DIR to the directory holding reference/)"
        if os.environ.get("APR_REQUIRE_REFERENCE") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    _verify_reference_manifest(path)
    return path


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_reference_manifest(path: Path) -> None:
    """Fail (never skip) when a reference file is missing or differs from ``manifest.json``'s sha256."""
    import json

    manifest = path / "manifest.json"
    if not manifest.is_file():
        pytest.fail(f"{manifest} is missing: the parity reference cannot be verified", pytrace=False)
    expected = json.loads(manifest.read_text())["file_sha256"]
    bad = [
        name
        for name, digest in sorted(expected.items())
        if not (path / name).is_file() or _sha256(path / name) != digest
    ]
    if bad:
        pytest.fail(
            f"parity reference files missing or changed (sha256 differs from manifest.json): {', '.join(bad)}",
            pytrace=False,
        )


def find_console_script(name: str) -> Path:
    """Return the path of console script ``name`` installed in this venv (``sys.prefix/bin``).

    ``setup.cfg`` sends non-editable ``setup.py install`` scripts to ``lib/apr_localizer`` (the ROS layout), so that
    directory is searched second.
    """
    for directory in (Path(sys.prefix) / "bin", Path(sys.prefix) / "lib" / "apr_localizer"):
        path = directory / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        f"console script {name!r} not found in {Path(sys.prefix) / 'bin'}: install the package (make venv)."
    )


@pytest.fixture(scope="session")
def venv_bin() -> Callable[[str], Path]:
    """Return a function mapping a console-script name to its path in the venv (see find_console_script)."""
    return find_console_script


@pytest.fixture
def ros_env(tmp_path: Path) -> dict[str, str]:
    """Environment for ROS subprocesses of one test: a per-test ROS_DOMAIN_ID and ROS_LOG_DIR under tmp_path.

    In-process rclpy code that must talk to these subprocesses has to use the same domain:
    ``rclpy.init(context=ctx, domain_id=int(ros_env["ROS_DOMAIN_ID"]))`` (or the ``rclpy_context`` fixture).
    The repo root is prepended to PYTHONPATH so subprocesses import this checkout.
    """
    log_dir = tmp_path / "ros_log"
    log_dir.mkdir()
    return subprocess_env(log_dir, exclude_domain=int(os.environ["ROS_DOMAIN_ID"]), pythonpath=REPO_ROOT)


@pytest.fixture(scope="module")
def node_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Like ``ros_env``, for a whole test module (one domain for its node processes and its :class:`RosHarness`)."""
    log_dir = tmp_path_factory.mktemp("ros_log")
    return subprocess_env(log_dir, exclude_domain=int(os.environ["ROS_DOMAIN_ID"]), pythonpath=REPO_ROOT)


@pytest.fixture(scope="module")
def harness(node_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[Any]:
    """Yield an in-process rclpy driver node on the module's ``node_env`` domain (pubs, subs, services)."""
    from apr_training.ros_harness import RosHarness

    h = RosHarness(int(node_env["ROS_DOMAIN_ID"]), name=f"{request.module.__name__.rsplit('.', 1)[-1]}_driver")
    yield h
    h.close()


REFERENCE_CHECKPOINT = "checkpoints/ms_transformer_7scenes_t2-2_rot1-1.pth"


@pytest.fixture(scope="module")
def checkpoint(reference_dir: Path) -> Path:
    """Return the reference MS-Transformer checkpoint (official format, 7 scenes)."""
    return reference_dir / REFERENCE_CHECKPOINT


@pytest.fixture(scope="module")
def frames(reference_dir: Path) -> list[Any]:
    """Return the four 480x640 reference frames as RGB uint8 arrays."""
    import numpy as np
    from PIL import Image as PILImage

    return [np.asarray(PILImage.open(reference_dir / "raw_images" / f"raw_{i}.png").convert("RGB")) for i in range(4)]


@pytest.fixture(scope="module")
def direct(checkpoint: Path) -> Iterator[Any]:
    """Yield the Localizer the node tests start, run in this process (torch CPU, 1 thread like those nodes)."""
    import torch

    from apr_localizer.localizer import Localizer, LocalizerOptions

    threads = torch.get_num_threads()
    loc = Localizer.from_files(checkpoint, options=LocalizerOptions(backend="torch", device="cpu", threads=1))
    yield loc
    loc.close()
    torch.set_num_threads(threads)


@pytest.fixture
def rclpy_context(ros_env: dict[str, str]) -> Iterator[Any]:
    """Yield an initialised private ``rclpy.Context`` on the ``ros_env`` domain; shut it down after the test."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=int(ros_env["ROS_DOMAIN_ID"]))
    try:
        yield context
    finally:
        context.try_shutdown()
