"""The audit trail: reading it (``trail``), expert feedback and retain (``feedback``), removing
cases (``removal``) and exporting rows (``export``).
"""

from cbr.pipeline.audit.export import EXPORT_FORMATS, EXPORTS, export
from cbr.pipeline.audit.feedback import NewClassError, RetainError, add_feedback
from cbr.pipeline.audit.removal import remove_cases
from cbr.pipeline.audit.trail import history, rerender_report, show

__all__ = ["history", "show", "rerender_report", "add_feedback", "RetainError", "NewClassError", "remove_cases", "export",
           "EXPORTS", "EXPORT_FORMATS"]

