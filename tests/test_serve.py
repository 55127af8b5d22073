"""`autoquant serve` as a client sees it: the real server (uvicorn, builtin:tiny-sd on the CPU)
in a subprocess on a free loopback port, plus the batching and error paths in-process."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The serve extra is part of the suite (scripts/setup --dev installs it): a missing one fails the
# collection here instead of skipping the server's tests.
import fastapi  # noqa: F401
import httpx
import pytest
import uvicorn  # noqa: F401

from autoquant.serve.metrics import Metrics
from autoquant.serve.schema import Generation
from autoquant.serve.worker import Job, images_that_fit, run_halving

REPO = Path(__file__).resolve().parents[1]
# The queue is small so the full-queue test can fill it; batches may hold up to 8 images.
QUEUE_SIZE = 4
SLOW_STEPS = 100  # a request that keeps the worker busy for a few seconds at 64x64


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        AUTOQUANT_CACHE_DIR=str(session_cache),
    )
    command = [
        sys.executable,
        "-m",
        "autoquant",
        "serve",
        "--model",
        "builtin:tiny-sd",
        "--device",
        "cpu",
        "--port",
        str(port),
        "--queue-size",
        str(QUEUE_SIZE),
        "--max-batch",
        "8",
    ]
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    running = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        _wait_until_ready(running)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_until_ready(server: Server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready in {timeout} s:\n{server.log_tail()}")


def _metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    pairs = re.findall(r"^(\S+) (\S+)$", text, flags=re.MULTILINE)
    return {name: float(value) for name, value in pairs}


def _wait_for(condition: Callable[[dict[str, float]], bool], server: Server) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = _metrics(server)
        if condition(metrics):
            return metrics
        time.sleep(0.02)
    pytest.fail(f"metrics never satisfied the condition:\n{server.log_tail()}")


def _generate(server: Server, **body: Any) -> Any:
    return httpx.post(f"{server.url}/generate", json=body, timeout=120)


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def _pixels(data: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image, dtype=np.int16)


def _busy_worker(server: Server, pool: ThreadPoolExecutor) -> Future[Any]:
    """Start a slow request and return once the worker is running it (the queue is empty)."""
    slow = pool.submit(_generate, server, prompt="slow", steps=SLOW_STEPS, seed=0)
    _wait_for(lambda m: m["autoquant_running_requests"] == 1, server)
    return slow


def test_health_report_and_docs(server: Server) -> None:
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ready"}
    report = httpx.get(f"{server.url}/report").json()
    assert report["model"] == "builtin:tiny-sd" and report["chosen"]["label"]
    assert str(REPO) not in health.text + httpx.get(f"{server.url}/report").text
    assert httpx.get(f"{server.url}/docs").status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()
    width = schema["components"]["schemas"]["GenerateRequest"]["properties"]["width"]
    assert (width["anyOf"][0]["minimum"], width["anyOf"][0]["maximum"]) == (64, 2048)


def test_concurrent_requests_are_batched_and_keep_their_seeds(server: Server) -> None:
    quick = {"steps": 2, "width": 64, "height": 64}
    with ThreadPoolExecutor(8) as pool:
        slow = _busy_worker(server, pool)
        # These queue up behind the slow one and then run as one batch of 4 requests.
        calls = [
            pool.submit(_generate, server, prompt=f"prompt {seed}", seed=seed, **quick)
            for seed in (1, 2, 3)
        ]
        pair = pool.submit(_generate, server, prompt="two", seed=7, n=2, **quick)
        _wait_for(lambda m: m["autoquant_queue_depth"] == 4, server)
        answers = [call.result() for call in calls]
        assert slow.result().status_code == 200
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "image/png"
        assert _png_size(answer.content) == (64, 64)
    two = pair.result()
    assert two.status_code == 200 and two.json()["seed"] == 7
    assert [_png_size(base64.b64decode(png)) for png in two.json()["images"]] == [(64, 64)] * 2
    metrics = _metrics(server)
    assert metrics['autoquant_batch_size_total{size="4"}'] >= 1, metrics
    # The same request alone gives the image it got inside the batch, up to rounding (bf16
    # matmuls are blocked differently for another batch size).
    alone = _generate(server, prompt="prompt 2", seed=2, **quick)
    assert alone.headers["x-seed"] == "2"
    difference = abs(_pixels(alone.content) - _pixels(answers[1].content))
    assert difference.max() <= 4 and difference.mean() < 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"width": 65}, "width"),
        ({"height": 4096}, "height"),
        ({"width": 32}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"n": 9}, "n"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"seed": -1}, "seed"),
        ({"guidance_scale": "lots"}, "guidance_scale"),
        ({"sampler": "euler"}, "sampler"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_bad_fields_get_422_naming_the_field(
    server: Server, body: dict[str, Any], field: str
) -> None:
    answer = _generate(server, **{"prompt": "a cat", **body})
    assert answer.status_code == 422
    detail = answer.json()
    assert [error["field"] for error in detail["errors"]] == [field]
    assert detail["detail"].startswith(f"{field}: ")
    assert "Traceback" not in answer.text and str(REPO) not in answer.text


def test_a_body_that_is_not_json_is_a_422(server: Server) -> None:
    answer = httpx.post(
        f"{server.url}/generate", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "body"


def test_full_queue_is_503_and_sigterm_drains(server: Server) -> None:
    # Last in this module: it stops the server.
    quick = {"prompt": "queued", "steps": 2}
    with ThreadPoolExecutor(8) as pool:
        slow = _busy_worker(server, pool)
        queued = [pool.submit(_generate, server, seed=seed, **quick) for seed in range(QUEUE_SIZE)]
        _wait_for(lambda m: m["autoquant_queue_depth"] == QUEUE_SIZE, server)
        refused = _generate(server, **quick)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.log_tail()
        assert slow.result().status_code == 200
        assert [call.result().status_code for call in queued] == [200] * QUEUE_SIZE
    with pytest.raises(httpx.TransportError):
        _generate(server, **quick)
    assert "Traceback" not in server.log_tail()


def test_a_tuning_failure_stops_the_server_with_one_line(session_cache: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", AUTOQUANT_CACHE_DIR=str(session_cache))
    command = [sys.executable, "-m", "autoquant", "serve", "--backend", "nosuch"]
    command += ["--port", str(_free_port())]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("autoquant: error: ") and "unknown backend 'nosuch'" in last
    assert "Traceback" not in done.stderr


# -- in-process: out-of-memory splitting and internal errors --------------------------------


def _jobs(count: int) -> list[Job]:
    generation = Generation("p", None, 64, 64, 2, None, seed=0, n=1)
    return [Job(generation) for _ in range(count)]


def test_a_batch_that_runs_out_of_memory_is_halved_until_it_fits() -> None:
    calls: list[int] = []

    def run_batch(jobs: list[Job]) -> list[list[Any]]:
        calls.append(len(jobs))
        if len(jobs) > 2:
            raise RuntimeError("CPU: can't allocate memory: you tried to allocate 1 GB")
        return [[id(job)] for job in jobs]

    jobs = _jobs(5)
    metrics = Metrics()
    outputs = run_halving(jobs, run_batch, lambda job: [id(job)], "cpu", metrics)
    assert outputs == [[id(job)] for job in jobs]  # every job its own images, in order
    assert calls == [5, 2, 3, 2]  # 5 → 2 + 3 → 3 splits into 1 (single path) + 2
    text = metrics.render({})
    assert "autoquant_batch_splits_total 2" in text and "autoquant_ooms_recovered_total 2" in text


def test_images_per_call_follow_free_memory_within_max_batch() -> None:
    mib = 2**20
    assert images_that_fit(1000 * mib, 100 * mib, max_batch=8) == 8  # 0.8 × 1000 / 100
    assert images_that_fit(400 * mib, 100 * mib, max_batch=8) == 3
    assert images_that_fit(10 * mib, 100 * mib, max_batch=8) == 1  # the oldest always runs
    assert images_that_fit(10 * mib, 0, max_batch=4) == 4  # nothing measured: the flag decides


def test_other_errors_are_not_split() -> None:
    def run_batch(_jobs: list[Job]) -> list[list[Any]]:
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        run_halving(_jobs(4), run_batch, lambda job: [], "cpu", Metrics())


def test_an_internal_error_is_a_generic_500_with_an_id(caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from autoquant.execute.tuning import TuneOptions
    from autoquant.serve.app import create_app
    from autoquant.serve.worker import READY, Worker, WorkerSettings

    class BrokenWorker(Worker):
        """Ready at once; every generation fails the way a bug would."""

        state = READY
        default_size = (64, 64)

        def start(self) -> None:
            pass

        def submit(self, generation: Generation) -> Future[list[Any]]:
            failed: Future[list[Any]] = Future()
            failed.set_exception(RuntimeError(f"boom in {REPO}/secret.py"))
            return failed

    worker = BrokenWorker(TuneOptions(), WorkerSettings(), Metrics())
    with TestClient(create_app(worker), raise_server_exceptions=False) as client:
        answer = client.post("/generate", json={"prompt": "a cat"})
    assert answer.status_code == 500
    body = answer.json()
    assert body["detail"] == "internal error" and re.fullmatch(r"[0-9a-f]{12}", body["error_id"])
    assert "boom" not in answer.text and str(REPO) not in answer.text
    assert body["error_id"] in caplog.text and "boom" in caplog.text
