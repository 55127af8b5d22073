"""Images/s of `autoquant serve --ray` with 1 replica and with 2, on a local Ray cluster, and
what a replica killed under load does to the requests it held.

    OMP_NUM_THREADS=1 python scripts/ray_loadtest.py                 # builtin:tiny-sd, CPU
    python scripts/ray_loadtest.py --replicas 1 2 4 --requests 32 --steps 20
    OMP_NUM_THREADS=1 python scripts/ray_loadtest.py --kill          # and the kill test

Starts Ray in this process (loopback only, no dashboard), deploys the replicas, sends one warm-up
request, then --requests requests --concurrency at a time, each bounded by --timeout. Prints a
Markdown table (JSON with --json): images/s, p50/p95 latency of the 200 answers, the answers by
status, and how many replicas answered. --kill then deploys 2 replicas, kills one (ray.kill of
its actor) while --requests requests run, and prints the answers by status, how many 503s carried
Retry-After, and whether a new replica took the dead one's place. tests/test_ray.py drives the
same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import httpx

# What a replica's worker process needs from this one (Ray starts them from its raylet).
FORWARDED_ENV = (
    "OMP_NUM_THREADS",
    "HF_HUB_OFFLINE",
    "AUTOQUANT_CACHE_DIR",
    "TOKENIZERS_PARALLELISM",
)


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no answer within the timeout
    replica: str | None  # X-Autoquant-Replica
    seconds: float
    retry_after: str | None


@dataclass
class Load:
    replicas: int
    requests: int
    concurrency: int
    seconds: float
    images_per_second: float
    p50_seconds: float
    p95_seconds: float
    statuses: dict[int, int]  # answers by HTTP status; 0: no answer within the timeout
    replicas_seen: list[str] = field(default_factory=list)  # X-Autoquant-Replica of 200s


@dataclass
class Kill:
    """What a replica killed under load did to the requests: tests/test_ray.py's kill test."""

    requests: int
    concurrency: int
    killed: str  # the replica killed
    replacement: str  # the replica that took its place
    replaced_seconds: float  # from the kill until the replacement ran
    statuses: dict[int, int]  # the answers under load by HTTP status; 0: none within the timeout
    retry_after: int  # of the 503s, how many carried Retry-After
    retried: dict[int, int]  # the answers by status of the non-200s, sent again once replaced


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_cluster(cpus: int) -> Iterator[str]:
    """A Ray cluster in this process with Ray Serve's proxy on a free loopback port; yields the
    endpoint's URL."""
    import ray
    from ray import serve

    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,  # the replicas' logs stay in Ray's session folder
        runtime_env={"env_vars": env},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(replicas: int, *, model: str, size: int, max_request_seconds: float = 1000) -> None:
    """Deploy (or resize) the application with ``replicas``, on the CPU; returns once they are
    all tuned and running."""
    from ray import serve

    from autoquant.execute.tuning import TuneOptions
    from autoquant.serve import ray_deploy
    from autoquant.serve.schema import SizeLimits
    from autoquant.serve.worker import WorkerSettings

    options = TuneOptions(model=model, device="cpu", width=size, height=size, progress=False)
    settings = WorkerSettings(max_request_seconds=max_request_seconds)
    app = ray_deploy.application(options, settings, SizeLimits(min_side=8), replicas)
    serve.run(app, name=ray_deploy.APP_NAME, route_prefix="/")
    wait_for_replicas(replicas)


def running_replicas() -> int:
    from ray import serve

    from autoquant.serve import ray_deploy

    app = serve.status().applications.get(ray_deploy.APP_NAME)
    deployment = app.deployments.get(ray_deploy.REPLICAS_DEPLOYMENT) if app else None
    return int(deployment.replica_states.get("RUNNING", 0)) if deployment else 0


def replica_actors() -> dict[str, str]:
    """The replicas' ids (X-Autoquant-Replica) → their actors' names, from Ray's public list of
    named actors (Ray Serve names them SERVE_REPLICA::app#deployment#id)."""
    import ray

    from autoquant.serve import ray_deploy

    prefix = f"SERVE_REPLICA::{ray_deploy.APP_NAME}#{ray_deploy.REPLICAS_DEPLOYMENT}#"
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    return {name.removeprefix(prefix): name for name in names if name.startswith(prefix)}


def wait_for_replicas(count: int, timeout: float = 180) -> None:
    """Until exactly ``count`` replicas run (a resize down stops the others in the background)."""
    deadline = time.monotonic() + timeout
    while running_replicas() != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} replica(s) not running in {timeout:g} s")
        time.sleep(0.2)


def generate(url: str, seed: int, steps: int, timeout: float) -> Answer:
    """One request, bounded by ``timeout``."""
    started = time.perf_counter()
    try:
        answer = httpx.post(
            f"{url}/generate",
            json={"prompt": "a lighthouse at dusk", "steps": steps, "seed": seed},
            timeout=timeout,
        )
    except httpx.TimeoutException:
        return Answer(0, None, time.perf_counter() - started, None)
    return Answer(
        answer.status_code,
        answer.headers.get("x-autoquant-replica"),
        time.perf_counter() - started,
        answer.headers.get("retry-after"),
    )


def load(
    url: str, replicas: int, *, requests: int, concurrency: int, steps: int, timeout: float
) -> Load:
    generate(url, 0, steps, timeout)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda seed: generate(url, seed, steps, timeout), range(requests)))
    seconds = time.perf_counter() - started
    latencies = sorted(answer.seconds for answer in answers if answer.status == 200)
    ok = len(latencies)
    return Load(
        replicas=replicas,
        requests=requests,
        concurrency=concurrency,
        seconds=round(seconds, 3),
        images_per_second=round(ok / seconds, 3),
        p50_seconds=round(statistics.median(latencies), 3) if latencies else float("nan"),
        p95_seconds=round(latencies[max(0, -(-95 * ok // 100) - 1)], 3)
        if latencies
        else float("nan"),
        statuses=dict(Counter(answer.status for answer in answers)),
        replicas_seen=sorted({a.replica for a in answers if a.status == 200 and a.replica}),
    )


def kill_during_load(
    url: str, *, requests: int, concurrency: int, steps: int, timeout: float
) -> Kill:
    """Send ``requests`` requests ``concurrency`` at a time and kill one replica's actor halfway
    through its second batch: half its first answer's latency after that answer (a replica
    answers a whole batch at once, and the threads at once send the next requests, which keep
    ``concurrency`` in flight over both replicas). Then wait until Ray Serve has replaced it,
    and send the requests that were not answered 200 again."""
    import ray

    before = replica_actors()
    victim = sorted(before)[0]
    killed: float | None = None
    with ThreadPoolExecutor(concurrency) as pool:
        pending = [pool.submit(generate, url, seed, steps, timeout) for seed in range(requests)]
        for done in as_completed(pending):
            if killed is None and done.result().replica == victim:
                time.sleep(done.result().seconds / 2)
                ray.kill(ray.get_actor(before[victim], namespace="serve"))
                killed = time.monotonic()
        answers = [future.result() for future in pending]
    if killed is None:
        raise RuntimeError(f"replica {victim} answered none of {requests} requests")
    # Ray's controller notices the death at its next health check and starts a replacement,
    # which runs once it has tuned (from the store: the dead replica's decision).
    while True:
        after_kill = replica_actors()
        replaced = victim not in after_kill and len(after_kill) == len(before)
        if replaced and running_replicas() == len(before):
            break
        if time.monotonic() - killed > timeout:
            raise TimeoutError(f"replica {victim} not replaced in {timeout:g} s: {after_kill}")
        time.sleep(0.2)
    replaced_seconds = time.monotonic() - killed
    retried = [
        generate(url, seed, steps, timeout).status
        for seed, answer in enumerate(answers)
        if answer.status != 200
    ]
    return Kill(
        requests=requests,
        concurrency=concurrency,
        killed=victim,
        replacement=next(iter(set(after_kill) - set(before))),
        replaced_seconds=round(replaced_seconds, 3),
        statuses=dict(Counter(answer.status for answer in answers)),
        retry_after=sum(1 for a in answers if a.status == 503 and a.retry_after is not None),
        retried=dict(Counter(retried)),
    )


def table(loads: list[Load], model: str, steps: int, size: int) -> str:
    lines = [
        f"{model}, {size}x{size}, {steps} steps, CPU (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} CPUs",
        "",
        "| replicas | requests | concurrency | images/s | p50 s | p95 s | answers | replicas |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in loads:
        answers = ", ".join(f"{n}× {status}" for status, n in sorted(r.statuses.items()))
        lines.append(
            f"| {r.replicas} | {r.requests} | {r.concurrency} | {r.images_per_second:.2f} | "
            f"{r.p50_seconds:.2f} | {r.p95_seconds:.2f} | {answers} | {len(r.replicas_seen)} |"
        )
    return "\n".join(lines)


def kill_table(kill: Kill) -> str:
    def counts(statuses: dict[int, int]) -> str:
        return ", ".join(f"{n}× {status}" for status, n in sorted(statuses.items())) or "none"

    return "\n".join(
        [
            "| requests | concurrency | answers | 503 with Retry-After | replaced in s | retried |",
            "|---:|---:|---|---:|---:|---|",
            f"| {kill.requests} | {kill.concurrency} | {counts(kill.statuses)} | "
            f"{kill.retry_after} | {kill.replaced_seconds:.1f} | {counts(kill.retried)} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny-sd")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--cpus", type=int, default=os.cpu_count() or 2, help="Ray's CPUs (replicas use one each)"
    )
    p.add_argument("--requests", type=int, default=16, help="at most 64")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120, help="seconds a request may take")
    p.add_argument(
        "--kill", action="store_true", help="then kill one of 2 replicas under --requests requests"
    )
    p.add_argument(
        "--kill-steps",
        type=int,
        default=10,
        help="steps of the kill test's requests (long enough that the killed replica holds some)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 64:
        p.error("--requests must be from 1 to 64")
    loads: list[Load] = []
    kill: Kill | None = None
    traffic = dict(concurrency=args.concurrency, steps=args.steps, timeout=args.timeout)
    with local_cluster(args.cpus) as url:
        for count in args.replicas:
            deploy(count, model=args.model, size=args.size)
            loads.append(load(url, count, requests=args.requests, **traffic))
        if args.kill:
            # serve.run again, even of the same application, would restart every replica.
            if not loads or loads[-1].replicas != 2:
                deploy(2, model=args.model, size=args.size)
            kill = kill_during_load(
                url,
                requests=args.requests,
                concurrency=args.concurrency,
                steps=args.kill_steps,
                timeout=args.timeout,
            )
    if args.json:
        print(json.dumps({"loads": [asdict(r) for r in loads], "kill": kill and asdict(kill)}))
    else:
        print(table(loads, args.model, args.steps, args.size))
        if kill is not None:
            print(f"\nA replica killed under load (2 replicas):\n\n{kill_table(kill)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
