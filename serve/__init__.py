"""sdc-runtime serve: the codec as an HTTP service (the serve extra; the runtime never imports it).

``create_app`` needs the serve extra; ``command`` (the subcommand) and ``settings`` do not."""
from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name):
    if name == "create_app":  # Starlette is imported only by whoever builds the app
        from .app import create_app
        return create_app
    raise AttributeError(name)
