"""The service's settings, declared once: the serve command's flags and create_app take them."""
from __future__ import annotations

from dataclasses import dataclass

from sdc_runtime.errors import SdcUsageError


@dataclass(frozen=True)
class ServeSettings:
    """``workers`` threads run neural work; up to ``queue`` more requests wait (beyond: 503);
    bodies over ``max_body`` bytes get 413; at SIGTERM, requests in flight have
    ``grace_seconds`` to finish."""

    workers: int = 2
    queue: int = 16
    max_body: int = 32 << 20
    grace_seconds: float = 60.0

    def __post_init__(self):
        if self.workers < 1 or self.queue < 0 or self.max_body < 1 or not self.grace_seconds >= 0:
            raise SdcUsageError("workers must be at least 1, queue at least 0, max_body at least 1 and"
                                " grace_seconds at least 0")
