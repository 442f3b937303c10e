"""Grad-CAM layer of cbr: methods, targets, maps, overlays and metrics. Never imports cbr."""
