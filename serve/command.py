"""``sdc-runtime serve``: the subcommand this package adds to the runtime's command line
(entry point group ``sdc_runtime.commands``), so the runtime never imports the service."""
from __future__ import annotations

import signal

from sdc_runtime.cli import codec_from_args, size_bytes
from sdc_runtime.extras import require_extra

from .settings import ServeSettings

DEFAULTS = ServeSettings()


def add_command(sub, common) -> None:
    p = sub.add_parser("serve", help="the codec as an HTTP service (the serve extra)")
    common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=DEFAULTS.workers,
                   help=f"threads running neural work (default {DEFAULTS.workers})")
    p.add_argument("--queue", type=int, default=DEFAULTS.queue,
                   help=f"requests that may wait for a worker; more get 503 (default {DEFAULTS.queue})")
    p.add_argument("--max-body", type=size_bytes, default=DEFAULTS.max_body, metavar="BYTES",
                   help=f"largest request body (default {DEFAULTS.max_body >> 20}M)")
    p.add_argument("--grace", type=float, default=DEFAULTS.grace_seconds, metavar="SECONDS",
                   help="at SIGTERM, how long requests in flight may take to finish; those still running then"
                        f" get a JSON 503 (default {DEFAULTS.grace_seconds:g})")
    p.set_defaults(run=_run)


def _run(args) -> None:
    require_extra("serve", "serve")
    import uvicorn

    from .app import create_app

    settings = ServeSettings(workers=args.workers, queue=args.queue, max_body=args.max_body,
                             grace_seconds=args.grace)
    app = create_app(codec_from_args(args), settings)
    # uvicorn: one access-log line per request; SIGTERM stops accepting and finishes in-flight
    # work, then uvicorn re-raises it to the handler it found: a no-op, so the exit status is 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=True,
                timeout_graceful_shutdown=settings.grace_seconds)
