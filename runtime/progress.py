"""Progress, one signature for the whole project: ``progress(stage, done, total)``, called with
``done`` 0 when a stage starts and after each of its ``total`` units; ``StageBars`` shows it."""
from __future__ import annotations

import sys
from typing import Callable, Optional

Progress = Optional[Callable[[str, int, int], None]]

# What a stage counts, for the bars (by its first word; others count steps).
UNITS = {"encode": "tile", "decode": "tile", "denoise": "step", "refine": "pass", "descend": "step",
         "score": "file", "size": "file", "calibrate": "image", "sweep": "unit"}


def report(progress: Progress, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


class StageBars:
    """tqdm bars on stderr, one per stage, each opened when its stage starts; nothing when not
    wanted or tqdm is missing (it is no runtime dependency)."""

    def __init__(self, enabled: bool):
        self.enabled, self.stage, self.bar = enabled, None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            try:
                from tqdm import tqdm
            except ImportError:
                self.enabled = False
                return
            unit = UNITS.get(stage.split()[0], "step")
            self.stage, self.bar = stage, tqdm(total=total, desc=stage, unit=unit, leave=False, file=sys.stderr)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
