"""The report: Table 1, the paper's claims and Figures 2-5, read back from MLflow (never rerunning anything)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from er_ray.report.build import ReportResult, build_report, report_from_files

__all__ = ["ReportResult", "build_report", "report_from_files"]


def __getattr__(name: str):
    # lazy: `er-ray --help` imports report.cli, which must not pull in torch, pandas and matplotlib
    if name in __all__:
        from er_ray.report import build

        return getattr(build, name)
    raise AttributeError(name)
