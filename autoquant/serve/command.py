"""`autoquant serve`: tune once, then serve the pipeline over HTTP until SIGTERM.

The tuning flags are those of `autoquant run`. fastapi and uvicorn are imported
only when the server starts, so the rest of the CLI works without the `serve` extra.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import signal
import socket
from collections.abc import Callable
from typing import Any

from autoquant.cli.args import add_tuning_arguments, tuning_options, width_height
from autoquant.core.errors import AutoquantError, error_line
from autoquant.core.units import parse_size
from autoquant.planner.rules import EXPECTED_IMAGES
from autoquant.serve.admission import DEFAULT_MAX_REQUEST_SECONDS

logger = logging.getLogger("autoquant.serve")

# Bounds of the serving flags, so that a typo is a usage error rather than a server that
# misbehaves later (an infinite batch window killed the worker thread; NaN made it spin).
MAX_BATCH_IMAGES = 64
MAX_QUEUE_SIZE = 1024
MAX_BATCH_WINDOW_MS = 10_000.0
SIDE_RANGE = (8, 8192)  # the latent grid is 1/8 of the image
MAX_REQUEST_SECONDS_RANGE = (1.0, 86_400.0)
MAX_REPLICAS = 1024
# Sizes a compiled plan serves besides --size: each one is a warm-up of every batch bucket (a
# compile, or a run at least, per bucket) before the server is ready.
MAX_SERVED_SIZES = 4


def _integer(low: int, high: int, *, multiple: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text) if text.isascii() and text.isdigit() else None
        if value is None or not low <= value <= high or value % multiple:
            what = f"a multiple of {multiple} " if multiple > 1 else "an integer "
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}from {low} to {high}")
        return value

    return parse


def _number(low: float, high: float, unit: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"{text!r} must be {unit} from {low:g} to {high:g}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    tuning = p.add_argument_group("tuning (as `autoquant run`)")
    add_tuning_arguments(
        tuning, size_help="WIDTHxHEIGHT tuned for and served by default (model's native)"
    )

    serving = p.add_argument_group("serving")
    serving.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    serving.add_argument(
        "--port", type=_integer(1, 65535), default=8000, help="port, 1-65535 (%(default)s)"
    )
    serving.add_argument(
        "--max-batch",
        type=_integer(1, MAX_BATCH_IMAGES),
        default=8,
        help="images per pipeline call at most; free memory may allow fewer; 1 turns batching "
        f"off; up to {MAX_BATCH_IMAGES} (%(default)s)",
    )
    serving.add_argument(
        "--queue-size",
        type=_integer(1, MAX_QUEUE_SIZE),
        default=32,
        help=f"requests waiting at most, up to {MAX_QUEUE_SIZE} (%(default)s)",
    )
    serving.add_argument(
        "--batch-window-ms",
        type=_number(0, MAX_BATCH_WINDOW_MS, "milliseconds"),
        default=20.0,
        help="how long the oldest request waits for others to join its batch, 0-"
        f"{MAX_BATCH_WINDOW_MS:g} (%(default)s)",
    )
    side = _integer(*SIDE_RANGE, multiple=8)
    for flag, default, which in (("--min-side", 64, "smallest"), ("--max-side", 2048, "largest")):
        serving.add_argument(
            flag,
            type=side,
            default=default,
            help=f"{which} width/height, a multiple of 8 up to {SIDE_RANGE[1]} (%(default)s)",
        )
    serving.add_argument(
        "--sizes",
        type=_sizes,
        default=(),
        metavar="WxH[,WxH…]",
        help="a compiled plan serves only the sizes it warmed up at start: --size and these "
        f"(up to {MAX_SERVED_SIZES}); another size is refused with 422. An eager plan serves "
        "every size within --min-side..--max-side and warms none",
    )
    serving.add_argument(
        "--expected-images",
        type=_integer(int(EXPECTED_IMAGES.low), int(EXPECTED_IMAGES.high or 1)),
        help="images the server is expected to make, over which a compiled plan's compile "
        "seconds are spread (planner.expected_images; default --queue-size: a server started "
        "is there to serve at least one full queue)",
    )
    serving.add_argument(
        "--max-request-seconds",
        type=_number(*MAX_REQUEST_SECONDS_RANGE, "seconds"),
        default=DEFAULT_MAX_REQUEST_SECONDS,
        help="refuse (422) a request predicted to take longer, from the tuned pipeline's "
        "measured step time scaled by its pixels, steps and images (%(default)s)",
    )
    fleet = p.add_argument_group("Ray Serve (docs/scaling.md; the `ray` extra)")
    fleet.add_argument(
        "--ray",
        action="store_true",
        help="serve as Ray Serve replicas, each tuning to its own device, behind one endpoint",
    )
    fleet.add_argument(
        "--replicas",
        type=_replicas,
        help=f"with --ray: replicas, 1-{MAX_REPLICAS}, or auto (Ray Serve's autoscaling on "
        "ongoing requests) (1)",
    )
    fleet.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --ray: the cluster to join (as `ray start --address`); default: start one here",
    )


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """--sizes: WIDTHxHEIGHT[,WIDTHxHEIGHT…], at most MAX_SERVED_SIZES distinct ones."""
    sizes = tuple(dict.fromkeys(width_height(part.strip()) for part in text.split(",")))
    if len(sizes) > MAX_SERVED_SIZES:
        raise argparse.ArgumentTypeError(f"{text!r}: {MAX_SERVED_SIZES} sizes at most")
    return sizes


def _replicas(text: str) -> int | str:
    """--replicas: a count, or "auto"."""
    return text if text == "auto" else _integer(1, MAX_REPLICAS)(text)


def _check_ray(args: argparse.Namespace) -> None:
    """--ray's flags, and that Ray is there, before anything heavy is imported."""
    if not args.ray:
        flag = "--replicas" if args.replicas else "--ray-address" if args.ray_address else ""
        if flag:
            raise AutoquantError(f"{flag} needs --ray")
        return
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise AutoquantError(
            "--ray needs Ray Serve: pip install 'autoquant-diffusers[ray]' (or 'ray[serve]')"
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
    return tuning_options(
        args, progress=False, expected_images=args.expected_images or args.queue_size
    )


def _check_sizes(args: argparse.Namespace) -> None:
    if args.min_side > args.max_side:
        raise AutoquantError(f"--min-side {args.min_side} is above --max-side {args.max_side}")
    named = [("--size", args.size)] if args.size else []
    for flag, (width, height) in named + [("--sizes", size) for size in args.sizes]:
        if not all(args.min_side <= side <= args.max_side for side in (width, height)):
            raise AutoquantError(
                f"{flag} {width}x{height} is outside --min-side {args.min_side} .. "
                f"--max-side {args.max_side}"
            )


def _check_listen(host: str, port: int) -> None:
    """Fail now, in one line, where the server could not listen (uvicorn binds only once the
    app has started, and its error would come after tuning)."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:  # socket.gaierror too: a host name that does not resolve
        raise AutoquantError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT. Returns 0 after a clean drain, 128 + the signal's number
    when a second signal aborted the drain, 1 when the worker thread died. A tuning failure
    stops the server and is raised here (an AutoquantError is the CLI's one-line error)."""
    # Profiles, backends, the model and the cache were checked by cli/validate.py before this
    # runs; what only a server has is checked here, before it tunes.
    _check_ray(args)
    _check_sizes(args)
    _check_listen(args.host, args.port)
    import uvicorn
    from diffusers.utils import logging as diffusers_logging

    from autoquant.serve.app import DrainingServer, create_app
    from autoquant.serve.metrics import Metrics
    from autoquant.serve.schema import SizeLimits
    from autoquant.serve.worker import Worker, WorkerSettings

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
        max_request_seconds=args.max_request_seconds,
        sizes=args.sizes,
    )
    if args.ray:
        from autoquant.serve import ray_deploy

        replicas = None if args.replicas == "auto" else args.replicas or 1
        limits = SizeLimits(args.min_side, args.max_side)
        where = dict(host=args.host, port=args.port, address=args.ray_address)
        return ray_deploy.run(_tune_options(args), settings, limits, replicas, **where)

    def stop_on_failure(_err: BaseException) -> None:
        server.should_exit = True  # uvicorn polls it; the error is raised below

    worker = Worker(_tune_options(args), settings, Metrics(), on_failure=stop_on_failure)
    app = create_app(worker, SizeLimits(args.min_side, args.max_side))
    config = uvicorn.Config(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=None, log_config=None
    )
    server = DrainingServer(config, worker)
    # uvicorn re-raises the signal it stopped for once it is done, with the handler that was
    # there before; no-op ones make a drain end in the exit status chosen below rather than in
    # death by SIGTERM or a KeyboardInterrupt.
    stopping = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda _sig, _frame: None) for sig in stopping}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if worker.error is not None and worker.failed_in_tuning:
        raise worker.error
    if worker.error is not None:
        logger.error("stopped: the worker thread died (%s)", error_line(worker.error))
        return 1
    if worker.aborted_by is not None:
        name = signal.Signals(worker.aborted_by).name
        logger.warning(
            "aborted the drain on a second signal (%s): %d queued request(s) answered 503 unrun",
            name,
            worker.aborted_requests,
        )
        return 128 + worker.aborted_by
    logger.info("drained and stopped")
    return 0
