"""The audit trail: reading it (``trail``), expert feedback and retain (``feedback``), removing
cases (``removal``) and exporting rows (``export``, ``regions``).

Import each from its module: reading the trail (``cbr history``) must not load retain's case
writer and calibration, which a re-export here would load with the package.
"""
