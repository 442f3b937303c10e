"""What a query's attribution maps cost: maps made, model evaluations, seconds, and a progress bar.

LIME, KernelSHAP and occlusion run the model on hundreds of perturbed images per map; the meter
states that cost while it is paid (a tqdm bar showing the evaluations) and after (``summary``).
"""

from __future__ import annotations

import time

from tqdm import tqdm

__all__ = ["MapMeter"]


class MapMeter:
    """Counts the maps and model evaluations of one query's explanations.

    Args:
        enabled: show a progress bar (on stderr) while maps are computed.

    Example:
        >>> meter = MapMeter(enabled=True)
        >>> meter.start(6, "lime(n=200,seg=slic50)")
        >>> compute_maps(..., progress=meter.callback())
        >>> meter.close(); meter.summary()
        'lime(n=200,seg=slic50): 6 maps, 1200 model evaluations, 41.2 s'
    """

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.maps = 0
        self.evaluations = 0
        self.spec = None
        self._bar = None
        self._t0 = None
        self.seconds = 0.0

    def start(self, total: int, spec: str) -> None:
        """Announce `total` maps made with `spec` (may be called once per ensemble member)."""
        self.spec = spec
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self.enabled:
            if self._bar is None:
                self._bar = tqdm(total=0, desc=f"explaining ({spec})", unit="map", leave=False)
            self._bar.total += int(total)
            self._bar.refresh()

    def callback(self):
        """A progress(done, total, evaluations) function for one compute_maps call."""
        state = {"done": 0, "evaluations": 0}

        def progress(done, total, evaluations):
            self.maps += done - state["done"]
            self.evaluations += evaluations - state["evaluations"]
            if self._bar is not None:
                self._bar.update(done - state["done"])
                self._bar.set_postfix(evaluations=self.evaluations)
            state.update(done=done, evaluations=evaluations)

        return progress

    def close(self) -> None:
        if self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self) -> str | None:
        """One line for the answer's notes, or None when no attribution map was made."""
        if not self.maps:
            return None
        return f"explanations {self.spec}: {self.maps} maps, {self.evaluations} model evaluations, {self.seconds:.1f} s"
