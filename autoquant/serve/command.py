"""`autoquant serve`: tune once, then serve the pipeline over HTTP until SIGTERM.

The tuning flags are those of `autoquant run`. fastapi and uvicorn are imported
only when the server starts, so the rest of the CLI works without the `serve` extra.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
from typing import Any

from autoquant.cli.args import add_tuning_arguments, positive_int, tuning_options
from autoquant.core.errors import AutoquantError
from autoquant.core.units import parse_size

logger = logging.getLogger("autoquant.serve")


def _side(text: str) -> int:
    side = positive_int(text)
    if side % 8:
        raise argparse.ArgumentTypeError(f"{text!r} must be a multiple of 8")
    return side


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of milliseconds, 0 or more")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    tuning = p.add_argument_group("tuning (as `autoquant run`)")
    add_tuning_arguments(
        tuning, size_help="WIDTHxHEIGHT tuned for and served by default (model's native)"
    )

    serving = p.add_argument_group("serving")
    serving.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    serving.add_argument("--port", type=int, default=8000, help="port (%(default)s)")
    serving.add_argument(
        "--max-batch",
        type=positive_int,
        default=8,
        help="images per pipeline call at most; free memory may allow fewer; 1 turns batching "
        "off (%(default)s)",
    )
    serving.add_argument(
        "--queue-size", type=positive_int, default=32, help="requests waiting at most (%(default)s)"
    )
    serving.add_argument(
        "--batch-window-ms",
        type=_milliseconds,
        default=20.0,
        help="how long the oldest request waits for others to join its batch (%(default)s)",
    )
    for flag, default, which in (("--min-side", 64, "smallest"), ("--max-side", 2048, "largest")):
        serving.add_argument(
            flag, type=_side, default=default, help=f"{which} width/height (%(default)s)"
        )


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `serve` to the `autoquant` command's subparsers."""
    p = subparsers.add_parser(
        "serve", help="tune once, then serve the pipeline over HTTP", allow_abbrev=False
    )
    add_arguments(p)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tune_options(args: argparse.Namespace) -> Any:
    # The server logs each tier instead of drawing progress bars.
    return tuning_options(args, progress=False)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean drain. A tuning failure stops the server and
    is raised here (an AutoquantError is the CLI's one-line error)."""
    # Reject bad profiles, backends and models before the server binds (cheap: no weights).
    from autoquant import models
    from autoquant.execute.tuning import settings_for

    settings_for(_tune_options(args))
    models.resolve(args.model)
    import uvicorn
    from diffusers.utils import logging as diffusers_logging

    from autoquant.serve.app import DrainingServer, create_app
    from autoquant.serve.metrics import Metrics
    from autoquant.serve.schema import SizeLimits
    from autoquant.serve.worker import Worker, WorkerSettings

    if args.min_side > args.max_side:
        raise AutoquantError(f"--min-side {args.min_side} is above --max-side {args.max_side}")
    # uvicorn's lines and ours at INFO, in one format; other libraries only warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:     %(message)s")
    for name in ("autoquant", "uvicorn"):
        logging.getLogger(name).setLevel(logging.INFO)
    diffusers_logging.disable_progress_bar()
    if not _is_loopback(args.host):
        logger.warning("binding %s: the API has no authentication, keep it private", args.host)
    settings = WorkerSettings(
        max_batch=args.max_batch,
        queue_size=args.queue_size,
        batch_window=args.batch_window_ms / 1000,
        vram_limit_bytes=parse_size(args.vram_limit) if args.vram_limit else None,
    )

    def stop_on_failure(_err: BaseException) -> None:
        server.should_exit = True  # uvicorn polls it; the error is raised below

    worker = Worker(_tune_options(args), settings, Metrics(), on_failure=stop_on_failure)
    app = create_app(worker, SizeLimits(args.min_side, args.max_side))
    config = uvicorn.Config(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=None, log_config=None
    )
    server = DrainingServer(config, worker)
    # uvicorn re-raises the signal it stopped for once it is done, with the handler that was
    # there before; a no-op one makes a drained SIGTERM end in exit 0 rather than death by it.
    previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if worker.error is not None:
        raise worker.error
    logger.info("drained and stopped")
    return 0
