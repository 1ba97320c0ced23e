"""sdc-runtime serve: the codec as an HTTP service (the serve extra; the runtime never imports it)."""
from .app import create_app

__all__ = ["create_app"]
