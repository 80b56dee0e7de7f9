"""The data audit's section of a page (audit.html, and a run's report.html), from the files the audit
wrote (rundir/audit.py): counts, parameters, and thumbnails of the top of each list."""

from __future__ import annotations

from pathlib import Path

from ..rundir.audit import AuditFiles, read_table
from ..rundir.layout import file_inside, read_json
from . import plots

PAGE_SHOWN = 100  # thumbnails per list on audit.html: the page stays a few MB at most
REPORT_SHOWN = 24  # per list in a run's report.html, which links to audit.html for the rest


def audit_section(folder: str | Path, shown: int = PAGE_SHOWN) -> dict | None:
    """What _audit.html shows of the audit in `folder`; None when there is none."""
    files = AuditFiles(folder)
    summary = read_json(files.json)
    if summary is None:
        return None
    root = Path(summary["root"])
    lists = {"issues": read_table(files.label_issues), "outliers": read_table(files.outliers),
             "quality": read_table(files.quality)}
    section = {"summary": summary, "counts": summary["counts"], "parameters": summary["parameters"],
               "page": files.html.name, "shown": shown}
    for name, rows in lists.items():
        section[name] = [{**row, "image": plots.thumbnail(file_inside(root, row["file"]))}
                         for row in rows[:shown]]
        section[f"more_{name}"] = max(0, len(rows) - shown)
    groups: dict[str, list[dict]] = {}
    for row in read_table(files.conflicts):
        groups.setdefault(row["group"], []).append(row)
    section["conflicts"] = [[{**row, "image": plots.thumbnail(file_inside(root, row["file"]))}
                             for row in group] for group in list(groups.values())[:shown]]
    section["more_conflicts"] = max(0, len(groups) - shown)
    return section

