"""``sdc-runtime serve``: the subcommand this package adds to the runtime's command line
(entry point group ``sdc_runtime.commands``), so the runtime never imports the service."""
from __future__ import annotations

import asyncio
import os
import signal
import sys

from sdc_runtime.cli import codec_from_args, size_bytes
from sdc_runtime.extras import require_extra

from .settings import ServeSettings

DEFAULTS = ServeSettings()
# After the grace period: time to send the 503s before uvicorn closes the connections.
CLOSE_SECONDS = 5


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
    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM, SIGINT: the grace period starts
            if not self.should_exit:
                asyncio.get_event_loop().call_soon_threadsafe(service.begin_shutdown)
            super().handle_exit(sig, frame)

    # uvicorn: one access-log line per request; SIGTERM stops accepting and lets in-flight
    # requests finish (those past the grace period answer 503), then uvicorn re-raises it to
    # the handler it found: a no-op, so the exit status is 0.  Its own cut comes later, so
    # that every request gets its answer.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=True,
                          timeout_graceful_shutdown=settings.grace_seconds + CLOSE_SECONDS)).run()
    if service.busy:  # a worker thread still runs past the grace period: do not wait for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
