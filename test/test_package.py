"""Package-level checks (the ament_lint equivalents) and apr_localizer.resources."""

from __future__ import annotations

import configparser
import importlib
import py_compile
import re
import runpy
import shutil
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import setuptools

from apr_localizer import resources

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "apr_localizer"

# Element order of package format 3 (http://download.ros.org/schema/package_format3.xsd): name, version,
# description, maintainer+, license+, (url|author)*, dependency elements in any order, export?.
_HEAD_RANK = {"name": 0, "version": 1, "description": 2, "maintainer": 3, "license": 4, "url": 5, "author": 5}
_DEPENDENCY_TAGS = {
    "build_depend",
    "build_export_depend",
    "buildtool_depend",
    "buildtool_export_depend",
    "exec_depend",
    "depend",
    "doc_depend",
    "test_depend",
    "conflict",
    "replace",
    "group_depend",
    "member_of_group",
}
_DEPENDENCY_RANK = 6
_EXPORT_RANK = 7


def check_package_format3(path: Path) -> ET.Element:
    """Check a package.xml against the rules of package format 3; return the root element."""
    root = ET.parse(path).getroot()
    assert root.tag == "package" and root.get("format") == "3", f'{path}: root must be <package format="3">'
    last_rank = -1
    counts: dict[str, int] = {}
    for child in root:
        tag = child.tag
        if tag in _HEAD_RANK:
            rank = _HEAD_RANK[tag]
        elif tag in _DEPENDENCY_TAGS:
            rank = _DEPENDENCY_RANK
        elif tag == "export":
            rank = _EXPORT_RANK
        else:
            raise AssertionError(f"{path}: unknown element <{tag}> in package format 3")
        assert rank >= last_rank, f"{path}: <{tag}> is out of order (format 3 element order)"
        last_rank = rank
        counts[tag] = counts.get(tag, 0) + 1
        if tag != "export":
            assert (child.text or "").strip(), f"{path}: <{tag}> must not be empty"
    for tag in ("name", "version", "description"):
        assert counts.get(tag) == 1, f"{path}: exactly one <{tag}> required"
    for tag in ("maintainer", "license"):
        assert counts.get(tag, 0) >= 1, f"{path}: at least one <{tag}> required"
    assert counts.get("export", 0) <= 1, f"{path}: at most one <export>"
    assert re.fullmatch(r"[a-z][a-z0-9_]*", root.findtext("name")), f"{path}: invalid package name"
    assert re.fullmatch(r"\d+\.\d+\.\d+", root.findtext("version")), f"{path}: version must be MAJOR.MINOR.PATCH"
    for maintainer in root.findall("maintainer"):
        assert re.fullmatch(r"[^@\s]+@[^@\s]+", maintainer.get("email", "")), f"{path}: maintainer needs an email"
    for tag in _DEPENDENCY_TAGS:
        names = [(e.text or "").strip() for e in root.findall(tag)]
        assert len(names) == len(set(names)), f"{path}: duplicate <{tag}> entries"
    return root


@pytest.fixture(scope="module")
def setup_kwargs() -> dict[str, Any]:
    """Keyword arguments setup.py passes to setuptools.setup (setup.py runs for real, setup() is captured)."""
    captured: dict[str, Any] = {}
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
        mp.chdir(REPO_ROOT)
        runpy.run_path(str(REPO_ROOT / "setup.py"), run_name="__main__")
    finally:
        mp.undo()
    assert captured, "setup.py did not call setuptools.setup()"
    return captured


def _entry_points(setup_kwargs: dict[str, Any]) -> dict[str, tuple[str, str]]:
    result = {}
    for spec in setup_kwargs["entry_points"]["console_scripts"]:
        name, target = (part.strip() for part in spec.split("=", 1))
        module, attr = target.split(":")
        result[name] = (module, attr)
    return result


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------------- lint


def test_ruff_check_passes() -> None:
    ruff = Path(sys.prefix) / "bin" / "ruff"
    assert ruff.is_file(), f"ruff not found at {ruff}: install requirements.txt"
    proc = subprocess.run(
        [str(ruff), "check", "--no-cache", "."], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("rel", ["package.xml", "scripts/tf2_msgs/package.xml"])
def test_package_xml_well_formed_with_xmllint(rel: str) -> None:
    xmllint = shutil.which("xmllint")
    if xmllint is None:
        pytest.skip("xmllint not installed (apt package libxml2-utils); test_package_xml_format3 checks the structure")
    proc = subprocess.run(
        [xmllint, "--noout", "--nonet", str(REPO_ROOT / rel)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_package_xml_format3() -> None:
    root = check_package_format3(REPO_ROOT / "package.xml")
    assert root.findtext("name") == PACKAGE
    assert root.findtext("export/build_type") == "ament_python"
    runtime = {e.text.strip() for e in root.findall("exec_depend") + root.findall("depend")}
    missing = {"rclpy", "sensor_msgs", "geometry_msgs", "tf2_msgs", "diagnostic_msgs"} - runtime
    assert not missing, f"package.xml: missing exec_depend/depend entries {sorted(missing)}"


def test_tf2_msgs_package_xml_format3() -> None:
    root = check_package_format3(REPO_ROOT / "scripts" / "tf2_msgs" / "package.xml")
    assert root.findtext("name") == "tf2_msgs"
    assert root.findtext("export/build_type") == "ament_cmake"
    assert {e.text for e in root.findall("buildtool_depend")} == {"ament_cmake", "rosidl_default_generators"}
    assert [e.text for e in root.findall("member_of_group")] == ["rosidl_interface_packages"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("<package format='3'><version>1.0.0</version><name>x</name></package>", "out of order"),
        ("<package format='2'><name>x</name></package>", "format"),
        (
            "<package format='3'><name>x</name><version>1.0</version><description>d</description>"
            "<maintainer email='a@b'>m</maintainer><license>MIT</license></package>",
            "MAJOR.MINOR.PATCH",
        ),
        (
            "<package format='3'><name>x</name><version>1.0.0</version><description>d</description>"
            "<maintainer email='a@b'>m</maintainer></package>",
            "license",
        ),
    ],
)
def test_format3_checker_rejects_invalid(tmp_path: Path, bad: str, message: str) -> None:
    path = tmp_path / "package.xml"
    path.write_text(bad)
    with pytest.raises(AssertionError, match=message):
        check_package_format3(path)


# ------------------------------------------------------------------------------------------------- setup files


def test_setup_files_consistent(setup_kwargs: dict[str, Any]) -> None:
    root = ET.parse(REPO_ROOT / "package.xml").getroot()
    assert setup_kwargs["name"] == PACKAGE == root.findtext("name")
    assert setup_kwargs["version"] == root.findtext("version") == importlib.import_module(PACKAGE).__version__
    assert (REPO_ROOT / "resource" / PACKAGE).is_file(), "ament index marker resource/apr_localizer missing"
    data_files = dict(setup_kwargs["data_files"])
    assert data_files["share/ament_index/resource_index/packages"] == [f"resource/{PACKAGE}"]
    assert "package.xml" in data_files[f"share/{PACKAGE}"]
    for files in data_files.values():
        for rel in files:
            assert (REPO_ROOT / rel).is_file(), f"setup.py data_files entry {rel} does not exist"
    assert {PACKAGE, "apr_training"} <= set(setup_kwargs["packages"])
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    assert cfg["develop"]["script_dir"] == f"$base/lib/{PACKAGE}"
    assert cfg["install"]["install_scripts"] == f"$base/lib/{PACKAGE}"


def test_console_script_targets_resolve(setup_kwargs: dict[str, Any]) -> None:
    missing = []
    for name, (module, attr) in _entry_points(setup_kwargs).items():
        if _module_file(module) is None:
            missing.append(f"{name} -> {module}:{attr}")
            continue
        target = getattr(importlib.import_module(module), attr, None)
        assert callable(target), f"console script {name}: {module}.{attr} is not a callable"
    if missing:
        warnings.warn(f"console scripts whose module does not exist yet: {', '.join(missing)}", stacklevel=1)


def test_console_scripts_installed(setup_kwargs: dict[str, Any], venv_bin) -> None:
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        pytest.skip("apr_localizer is not installed in this venv (make venv installs it editable)")
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    declared = {name: f"{module}:{attr}" for name, (module, attr) in _entry_points(setup_kwargs).items()}
    assert installed == declared, "installed entry points differ from setup.py: run make venv"
    for name in declared:
        assert venv_bin(name).is_file()


def test_launch_files_byte_compile(tmp_path: Path) -> None:
    launch_files = sorted((REPO_ROOT / "launch").glob("*.py"))
    if not launch_files:
        pytest.skip("no launch files in launch/")
    for path in launch_files:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)


# --------------------------------------------------------------------------------------------------- resources


def _fake_ament_prefix(prefix: Path) -> Path:
    """Create a real ament index prefix with apr_localizer registered; return its share dir."""
    marker = prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE
    marker.parent.mkdir(parents=True)
    marker.touch()
    share = prefix / "share" / PACKAGE
    (share / "config" / "training").mkdir(parents=True)
    (share / "launch").mkdir()
    return share


def test_resources_fall_back_to_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    assert resources.share_dir() == REPO_ROOT
    assert resources.config_path("fastdds_shm_big.xml") == REPO_ROOT / "config" / "fastdds_shm_big.xml"


def test_resources_prefer_ament_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    share = _fake_ament_prefix(tmp_path)
    (share / "config" / "training" / "only_installed.yaml").write_text("a: 1\n")
    (share / "launch" / "x.launch.py").write_text("")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    assert resources.share_dir() == share
    installed = share / "config" / "training" / "only_installed.yaml"
    assert resources.config_path("training/only_installed.yaml") == installed
    assert resources.launch_path("x.launch.py") == share / "launch" / "x.launch.py"
    # Not installed there (editable install, or a file added after installing): the source tree answers.
    assert resources.config_path("fastdds_shm_big.xml") == REPO_ROOT / "config" / "fastdds_shm_big.xml"


def test_resources_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_ament_prefix(tmp_path)
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no_such.yaml") as info:
        resources.config_path("no_such.yaml")
    assert str(tmp_path / "share" / PACKAGE / "config") in str(info.value)
    assert str(REPO_ROOT / "config") in str(info.value)
    with pytest.raises(FileNotFoundError, match="launch file"):
        resources.launch_path("no_such.launch.py")
    with pytest.raises(ValueError, match="relative path"):
        resources.config_path("../setup.py")
    with pytest.raises(ValueError, match="relative path"):
        resources.config_path(REPO_ROOT / "setup.py")


def test_non_editable_install_ships_data_files(tmp_path: Path) -> None:
    """``pip install .`` puts config/launch/marker under the prefix, and resources finds them via the ament index."""
    src = tmp_path / "src"
    src.mkdir()
    for rel in ("setup.py", "setup.cfg", "package.xml", "README.md"):
        if (REPO_ROOT / rel).exists():
            shutil.copy2(REPO_ROOT / rel, src / rel)
    for rel in ("resource", "config", "launch", PACKAGE, "apr_training"):
        if (REPO_ROOT / rel).exists():
            shutil.copytree(REPO_ROOT / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__"))
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip would first uninstall the venv's editable apr_localizer.
    pip_args = ["install", "--ignore-installed", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *pip_args, "--prefix", str(prefix), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    share = prefix / "share" / PACKAGE
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).is_file()
    assert (share / "package.xml").is_file()
    assert (share / "config" / "fastdds_shm_big.xml").is_file()
    site = prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    probe = (
        "from apr_localizer import resources; "
        "print(resources.__file__); print(resources.share_dir()); print(resources.config_path('fastdds_shm_big.xml'))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "AMENT_PREFIX_PATH": str(prefix)}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        str(site / PACKAGE / "resources.py"),
        str(share),
        str(share / "config" / "fastdds_shm_big.xml"),
    ]
