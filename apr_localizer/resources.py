"""Locate the package's installed data files (config/, launch/) with a source-tree fallback.

A colcon build or a plain ``pip install .`` installs ``config/`` and ``launch/`` under
``<prefix>/share/apr_localizer`` and registers the package in the ament index. An editable install
(``pip install -e .``) installs none of the ``data_files``, so there the files are taken from the source checkout that
the Python package is imported from. Every lookup tries the ament index first and the source tree second.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_NAME = "apr_localizer"


def _ament_share_dir() -> Path | None:
    """Return the share directory registered in the ament index, or None when there is none."""
    try:
        from ament_index_python.packages import get_package_share_directory

        path = Path(get_package_share_directory(PACKAGE_NAME))
    except Exception:  # not installed, AMENT_PREFIX_PATH unset (EnvironmentError), ament_index_python missing
        return None
    return path if path.is_dir() else None


def _source_share_dir() -> Path | None:
    """Return the source checkout root when this module is imported from one, else None."""
    root = Path(__file__).resolve().parents[1]
    package_xml = root / "package.xml"
    try:
        is_ours = f"<name>{PACKAGE_NAME}</name>" in package_xml.read_text(encoding="utf-8")
    except OSError:
        return None
    return root if is_ours else None


def _candidates() -> list[Path]:
    return [d for d in (_ament_share_dir(), _source_share_dir()) if d is not None]


def share_dir() -> Path:
    """Return the package's share directory: the ament one if installed, else the source checkout root.

    Raises:
        FileNotFoundError: if the package is neither in the ament index nor imported from a source checkout.

    """
    candidates = _candidates()
    if not candidates:
        raise FileNotFoundError(
            f"share directory of {PACKAGE_NAME} not found: it is not in the ament index (AMENT_PREFIX_PATH) and "
            f"{Path(__file__).resolve().parents[1]} is not its source checkout."
        )
    return candidates[0]


def _data_path(kind: str, name: str | Path) -> Path:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{kind} file name {str(name)!r} must be a relative path inside {kind}/.")
    candidates = _candidates()
    for base in candidates:
        path = base / kind / rel
        if path.is_file():
            return path
    searched = ", ".join(str(base / kind) for base in candidates) or "no share directory found"
    raise FileNotFoundError(f"{kind} file {str(name)!r} of {PACKAGE_NAME} not found (searched: {searched}).")


def config_path(name: str | Path) -> Path:
    """Return the path of ``config/<name>`` (e.g. ``"localizer.yaml"`` or ``"training/7scenes.yaml"``).

    Raises:
        ValueError: if ``name`` is absolute or leaves ``config/``.
        FileNotFoundError: if no installed or source ``config/`` holds the file.

    """
    return _data_path("config", name)


def launch_path(name: str | Path) -> Path:
    """Return the path of ``launch/<name>`` (e.g. ``"localize.launch.py"``).

    Raises:
        ValueError: if ``name`` is absolute or leaves ``launch/``.
        FileNotFoundError: if no installed or source ``launch/`` holds the file.

    """
    return _data_path("launch", name)
