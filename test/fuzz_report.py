"""Write the hostile-input campaign report: ``report.json`` and ``summary.txt`` from pytest's JUnit XML and records.

Usage: ``python test/fuzz_report.py <report dir>`` (``scripts/fuzz.sh`` runs it after the campaign). The directory
holds ``junit.xml`` (pytest ``--junitxml``) and ``records.json`` (measurements added by :func:`fuzz_support.record`).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from apr_localizer.fileio import atomic_write_text


def _tests(junit: Path) -> list[dict[str, Any]]:
    if not junit.is_file():
        return []
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        detail = ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, detail = "failed", (child.get("message") or "")[:300]
            elif child.tag == "skipped":
                kind = child.get("type") or ""
                outcome = "xfailed" if "xfail" in kind else "skipped"
                detail = (child.get("message") or "")[:300]
        out.append(
            {
                "test": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": float(case.get("time", 0.0)),
                "detail": detail,
            }
        )
    return out


def _fmt(record: dict[str, Any]) -> str:
    keys = [k for k in record if k not in ("name", "results")]
    parts = [f"{k}={record[k]:.1f}" if isinstance(record[k], float) else f"{k}={record[k]}" for k in keys]
    return f"  {record['name']}: " + ", ".join(parts)


def write_report(directory: Path, settings: dict[str, str] | None = None) -> dict[str, Any]:
    """Build and write ``report.json`` and ``summary.txt`` in ``directory``; returns the report."""
    tests = _tests(directory / "junit.xml")
    records_path = directory / "records.json"
    records = json.loads(records_path.read_text()) if records_path.is_file() else []
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    report = {"settings": settings or {}, "counts": counts, "tests": tests, "measurements": records}
    atomic_write_text(directory / "report.json", json.dumps(report, indent=1))
    lines = [
        "apr_localizer hostile-input campaign",
        "settings: " + ", ".join(f"{k}={v}" for k, v in (settings or {}).items()),
        "tests: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        "measurements:",
        *(_fmt(r) for r in records),
    ]
    bad = [t for t in tests if t["outcome"] in ("failed", "xfailed")]
    if bad:
        lines.append("failed or expected failures:")
        lines += [f"  {t['outcome']}: {t['test']}: {t['detail']}" for t in bad]
    atomic_write_text(directory / "summary.txt", "\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``fuzz_report.py DIR [KEY=VALUE ...]`` (settings shown in the report)."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: fuzz_report.py <report dir> [KEY=VALUE ...]", file=sys.stderr)
        return 2
    settings = dict(a.split("=", 1) for a in args[1:] if "=" in a)
    report = write_report(Path(args[0]), settings)
    print((Path(args[0]) / "summary.txt").read_text(), end="")
    return 1 if report["counts"].get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
