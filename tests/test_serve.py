"""`autoquant serve` as a client sees it: the real server (uvicorn, builtin:tiny-sd on the CPU)
in a subprocess on a free loopback port, plus the batching and error paths in-process."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
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
from autoquant.serve.schema import MAX_BODY_BYTES, Generation
from autoquant.serve.worker import Job, images_that_fit, run_halving

REPO = Path(__file__).resolve().parents[1]
# The queue is small so the full-queue test can fill it; batches may hold up to 8 images.
QUEUE_SIZE = 4
SLOW_STEPS = 100  # a request that keeps the worker busy for a few seconds at 64x64
# Far above what the slow requests here are predicted to take (even from a cold step time of a
# second), far below what a 2048² request at 150 steps is.
MAX_REQUEST_SECONDS = 1000


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    @property
    def port(self) -> int:
        return int(self.url.rpartition(":")[2])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(
    session_cache: Path,
    log: Path,
    *serve_args: str,
    launcher: tuple[str, ...] = ("-m", "autoquant"),
    env: dict[str, str] | None = None,
) -> Server:
    """`autoquant serve` for builtin:tiny-sd on the CPU, on a free port, logging to ``log``.
    ``launcher`` (Python's arguments before `serve`) runs the command another way: `-c` with a
    script that calls the CLI's main() with the arguments after it. ``env``: variables set
    besides this process's own."""
    port = _free_port()
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        AUTOQUANT_CACHE_DIR=str(session_cache),
        **(env or {}),
    )
    command = [sys.executable, *launcher, "serve", "--model", "builtin:tiny-sd"]
    command += ["--device", "cpu", "--port", str(port), *serve_args]
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    return Server(process, f"http://127.0.0.1:{port}", log)


@contextmanager
def _running(server: Server) -> Iterator[Server]:
    try:
        _wait_until_ready(server)
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def server(session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--queue-size", str(QUEUE_SIZE), "--max-batch", "8"]
    args += ["--max-request-seconds", str(MAX_REQUEST_SECONDS)]
    with _running(_start(session_cache, log, *args)) as running:
        yield running


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


def _count(metrics: dict[str, float], name: str, **labels: str) -> float:
    """A sample's value; 0 for one not exported yet (a counter no event has touched)."""
    text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return metrics.get(f"{name}{{{text}}}" if text else name, 0.0)


def _requests(metrics: dict[str, float], status: int) -> float:
    return _count(metrics, "autoquant_requests_total", status=str(status))


def _send_and_stay(server: Server, **body: Any) -> socket.socket:
    """POST /generate on a raw connection, answer unread: closing the socket is the client
    leaving mid-request."""
    payload = json.dumps(body).encode()
    head = (
        "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    client.sendall(head.encode() + payload)
    return client


def _wait_for_log(server: Server, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in server.log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} never logged:\n{server.log_tail()}")
        time.sleep(0.02)


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


def test_the_official_openai_client_lists_the_model_and_generates(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    served = [model.id for model in client.models.list().data]
    assert served == ["builtin:tiny-sd"]
    result = client.images.generate(
        model=served[0], prompt="a lighthouse", n=2, size="64x64", response_format="b64_json"
    )
    assert len(result.data) == 2
    images = [base64.b64decode(item.b64_json or "") for item in result.data]
    assert all(_png_size(image) == (64, 64) for image in images)
    assert images[0] != images[1]  # two images of one prompt, not one twice
    # The tuned size when none is asked for, and the model may be left out.
    default = client.images.generate(prompt="a lighthouse", response_format="b64_json")
    assert _png_size(base64.b64decode(default.data[0].b64_json or "")) == (64, 64)


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"response_format": "url"}, "BadRequestError", "response_format"),
        ({"size": "1004x64"}, "BadRequestError", "size"),
        ({"size": "big"}, "BadRequestError", "size"),
        ({"n": 99}, "BadRequestError", "n"),
        ({"model": "dall-e-3"}, "NotFoundError", "model"),
    ],
)
def test_openai_errors_have_openais_shape(
    server: Server, kwargs: dict[str, Any], error: str, param: str
) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(getattr(openai, error)) as raised:
        client.images.generate(prompt="a lighthouse", **kwargs)
    body = raised.value.body
    assert isinstance(body, dict) and body["param"] == param and body["message"]
    assert body["type"] == "invalid_request_error"
    raw = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", **kwargs})
    assert set(raw.json()) == {"error"}


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
    pngs = []
    for answer in answers:  # no Accept but httpx's */*: JSON, whatever n is
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        [png] = [base64.b64decode(image) for image in answer.json()["images"]]
        assert _png_size(png) == (64, 64)
        pngs.append(png)
    two = pair.result()
    assert two.status_code == 200 and two.json()["seed"] == 7
    assert [_png_size(base64.b64decode(png)) for png in two.json()["images"]] == [(64, 64)] * 2
    metrics = _metrics(server)
    assert metrics['autoquant_batch_size_total{size="4"}'] >= 1, metrics
    # The same request alone gives the image it got inside the batch, up to rounding (bf16
    # matmuls are blocked differently for another batch size); asked for as the PNG itself.
    alone = httpx.post(
        f"{server.url}/generate",
        json={"prompt": "prompt 2", "seed": 2, **quick},
        headers={"accept": "image/png"},
        timeout=120,
    )
    assert alone.headers["content-type"] == "image/png" and alone.headers["x-seed"] == "2"
    difference = abs(_pixels(alone.content) - _pixels(pngs[1]))
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


def test_a_request_this_machine_cannot_serve_is_refused_before_it_runs(server: Server) -> None:
    before = _metrics(server)
    worst = _generate(server, prompt="huge", width=2048, height=2048, steps=150, n=8)
    # 413 where the planner's estimate of its memory (79 GiB) is over the budget, which is any
    # machine with less RAM than that; else 422 for its predicted time (days of CPU).
    assert worst.status_code in (413, 422), worst.text
    detail = worst.json()["detail"]
    assert detail.startswith("2048x2048 × 8 images ")
    assert "GiB" in detail if worst.status_code == 413 else "--max-request-seconds" in detail
    after = _metrics(server)
    assert _requests(after, worst.status_code) == _requests(before, worst.status_code) + 1
    assert _requests(after, 200) == _requests(before, 200)
    assert after["autoquant_batches_total"] == before["autoquant_batches_total"]  # never ran


def test_a_body_over_the_limit_is_refused_before_it_is_parsed(server: Server) -> None:
    url, headers = f"{server.url}/generate", {"content-type": "application/json"}
    junk = b"{" + b"x" * MAX_BODY_BYTES  # not JSON either: parsed, it would be a 422
    told = httpx.post(url, content=junk, headers=headers)
    assert told.status_code == 413 and told.json()["detail"].startswith("request body over ")
    chunked = httpx.post(url, content=iter([junk[:1000], junk[1000:]]), headers=headers)
    assert chunked.status_code == 413  # no Content-Length to go by: counted as it arrives
    at_limit = httpx.post(url, content=junk[:MAX_BODY_BYTES], headers=headers)
    assert at_limit.status_code == 422  # read and parsed: the JSON is what is wrong


def test_a_queued_request_whose_client_left_is_dropped(server: Server) -> None:
    with ThreadPoolExecutor(2) as pool:
        slow = _busy_worker(server, pool)
        before = _metrics(server)
        client = _send_and_stay(server, prompt="gone", steps=2, seed=1)
        _wait_for(lambda m: m["autoquant_queue_depth"] == 1, server)
        client.close()
        dropped = _count(before, "autoquant_cancelled_total", stage="queued") + 1
        _wait_for(
            lambda m: (
                m["autoquant_queue_depth"] == 0
                and _count(m, "autoquant_cancelled_total", stage="queued") == dropped
            ),
            server,
        )
        assert slow.result().status_code == 200
    after = _metrics(server)
    assert after["autoquant_images_total"] == before["autoquant_images_total"] + 1  # slow's only
    assert _requests(after, 499) == _requests(before, 499) + 1
    assert _requests(after, 200) == _requests(before, 200) + 1


def test_a_running_request_whose_client_left_stops_at_its_next_step(server: Server) -> None:
    before = _metrics(server)
    client = _send_and_stay(server, prompt="gone while running", steps=150, seed=2)
    _wait_for(lambda m: m["autoquant_running_requests"] == 1, server)
    client.close()
    stopped = before["autoquant_stopped_calls_total"] + 1
    after = _wait_for(
        lambda m: (
            m["autoquant_stopped_calls_total"] == stopped and m["autoquant_running_requests"] == 0
        ),
        server,
    )
    assert _count(after, "autoquant_cancelled_total", stage="running") == (
        _count(before, "autoquant_cancelled_total", stage="running") + 1
    )
    assert _requests(after, 499) == _requests(before, 499) + 1
    assert _requests(after, 200) == _requests(before, 200)  # a cancelled request is no 200
    assert after["autoquant_images_total"] == before["autoquant_images_total"]
    steps = re.findall(r"stopped a call of 1 request\(s\) at step (\d+)/150", server.log_tail())
    assert steps and int(steps[-1]) < 150, server.log_tail()
    # The pipeline still serves after a call was stopped inside it.
    assert _generate(server, prompt="next", steps=2).status_code == 200


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


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--port", "99999"], "--port"),
        (["--port", "0"], "--port"),
        (["--port", "http"], "--port"),
        (["--batch-window-ms", "inf"], "--batch-window-ms"),
        (["--batch-window-ms", "nan"], "--batch-window-ms"),
        (["--batch-window-ms", "-1"], "--batch-window-ms"),
        (["--batch-window-ms", "1e9"], "--batch-window-ms"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-batch", "1000"], "--max-batch"),
        (["--queue-size", "0"], "--queue-size"),
        (["--queue-size", "10000000"], "--queue-size"),
        (["--min-side", "60"], "--min-side"),
        (["--max-side", "100000"], "--max-side"),
        (["--max-request-seconds", "0"], "--max-request-seconds"),
        (["--max-request-seconds", "inf"], "--max-request-seconds"),
        (["--max-request-seconds", "nan"], "--max-request-seconds"),
    ],
)
def test_bad_server_options_are_one_line_usage_errors(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from autoquant.cli.main import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", *args])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"autoquant serve: error: argument {flag}: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-side", "512", "--max-side", "256"], "--min-side 512 is above --max-side 256"),
        (["--size", "32x32"], "--size 32x32 is outside --min-side 64 .. --max-side 2048"),
    ],
)
def test_sizes_that_contradict_each_other_are_one_line_errors(
    args: list[str], message: str, session_cache: Path
) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", AUTOQUANT_CACHE_DIR=str(session_cache))
    command = [sys.executable, "-m", "autoquant", "serve", *args, "--port", str(_free_port())]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"autoquant: error: {message}"
    assert "Traceback" not in done.stderr


def test_a_port_in_use_is_a_one_line_error_before_tuning(session_cache: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", AUTOQUANT_CACHE_DIR=str(session_cache))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "autoquant", "serve", "--port", str(port)]
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"autoquant: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "tuning" not in done.stderr and "Traceback" not in done.stderr


# A server whose worker thread dies on its first batch, as a bug there would make it.
_DYING_SERVER = """
import sys
from autoquant.serve import worker
def serve(self, batch):
    raise RuntimeError("boom: a bug in the serving loop")
worker.Worker._serve = serve
from autoquant.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_dead_worker_thread_stops_the_server_non_zero(
    session_cache: Path, tmp_path: Path
) -> None:
    server = _start(session_cache, tmp_path / "server.log", launcher=("-c", _DYING_SERVER))
    with _running(server):
        answer = _generate(server, prompt="a cat", steps=2)
        assert answer.status_code == 503 and answer.json()["detail"] == "not ready: failed"
        assert server.process.wait(timeout=60) == 1, server.log_tail()
    line = "stopped: the worker thread died (RuntimeError: boom: a bug in the serving loop)"
    assert line in server.log_tail()


def test_a_second_signal_aborts_the_drain(session_cache: Path, tmp_path: Path) -> None:
    waiting = 6
    args = ("--queue-size", "8", "--max-request-seconds", str(MAX_REQUEST_SECONDS))
    server = _start(session_cache, tmp_path / "server.log", *args)
    with _running(server), ThreadPoolExecutor(waiting + 1) as pool:
        slow = pool.submit(_generate, server, prompt="slow", steps=150, seed=0)
        _wait_for(lambda m: m["autoquant_running_requests"] == 1, server)
        queued = [
            pool.submit(_generate, server, prompt="queued", steps=2, seed=s) for s in range(waiting)
        ]
        _wait_for(lambda m: m["autoquant_queue_depth"] == waiting, server)
        server.process.send_signal(signal.SIGTERM)
        _wait_for_log(server, "Shutting down")  # the drain has begun
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=60) == 128 + signal.SIGINT, server.log_tail()
        answers = [call.result() for call in queued]
        assert [answer.status_code for answer in answers] == [503] * waiting
        assert {answer.json()["detail"] for answer in answers} == {
            "aborted: the server is shutting down"
        }
        assert slow.result().status_code == 503  # stopped at its next step, not run to the end
    log = server.log.read_text(errors="replace")
    assert f"aborted the drain on a second signal (SIGINT): {waiting} queued request(s)" in log
    assert "drained and stopped" not in log
    assert "Traceback" not in log and "terminate called" not in log


def test_a_real_cpu_out_of_memory_halves_the_batch(session_cache: Path) -> None:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        AUTOQUANT_CACHE_DIR=str(session_cache),
        MALLOC_MMAP_THRESHOLD_="65536",  # why: tests/serve_oom_child.py
    )
    child = [sys.executable, str(REPO / "tests" / "serve_oom_child.py")]
    done = subprocess.run(child, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["images"] == [1] * 8  # every request answered with its image
    splits = re.search(r"^autoquant_batch_splits_total (\d+)$", outcome["metrics"], re.M)
    assert splits and int(splits[1]) >= 1, outcome
    # The allocator's own error under the cap, classified as out of memory by execute/memory.py.
    # (How many requests the first call held depends on how fast they queued: not asserted.)
    failures = [line for line in outcome["log"] if line.startswith("out of memory with ")]
    assert failures, outcome["log"]
    assert "can't allocate memory" in failures[0] or "MemoryError" in failures[0], failures[0]


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


def test_admission_refuses_what_memory_or_time_cannot_hold() -> None:
    from autoquant import models
    from autoquant.backends.tier import Tier
    from autoquant.serve.admission import Admission

    admission = Admission(
        inventory=models.inventory(models.resolve("builtin:tiny-sd")),
        tier=Tier("gguf", "q5_1", "bf16", ("unet",)),
        label="gguf q5_1",
        on_gpu=False,
        budget_bytes=2 * 2**30,
        step_seconds=0.05,
        step_size=(64, 64),
        max_seconds=60,
    )

    def ask(side: int, steps: int, n: int) -> Generation:
        return Generation("p", None, side, side, steps, None, seed=0, n=n)

    assert admission.refusal(ask(64, 20, 1)) is None
    memory = admission.refusal(ask(2048, 20, 8))  # the estimate: ~79 GiB
    assert memory is not None and memory.status == 413
    assert memory.detail.startswith("2048x2048 × 8 images needs ~") and "2.00 GiB" in memory.detail
    # ~1.6 GiB fits, but 0.05 s a step × (512/64)² pixels × 150 steps is 480 s.
    time_ = admission.refusal(ask(512, 150, 1))
    assert time_ is not None and time_.status == 422
    assert "~480 s" in time_.detail and "--max-request-seconds 60" in time_.detail
    assert admission.refusal(ask(512, 18, 1)) is None  # 57.6 s
    # A batch holds only as many images as finish in time: 7.5 s an image at 64², 150 steps.
    assert admission.images_in_time(ask(64, 150, 1), 32) == 8
    assert admission.images_in_time(ask(64, 2, 1), 8) == 8


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never {what}")
        time.sleep(0.05)


def test_a_dead_worker_thread_fails_health_and_answers_what_waits() -> None:
    from fastapi.testclient import TestClient

    from autoquant.execute.tuning import TuneOptions
    from autoquant.serve.app import create_app
    from autoquant.serve.worker import READY, NotAcceptingError, Worker, WorkerSettings

    class DyingWorker(Worker):
        def _tune(self) -> None:  # ready at once, without a pipeline: serving is under test
            with self._cond:
                self._state = READY

        def _serve(self, batch: list[Job]) -> None:
            raise RuntimeError("boom: a bug in the serving loop")

    failures: list[BaseException] = []
    settings = WorkerSettings(max_batch=1)  # no batch to size: there is no pipeline
    worker = DyingWorker(TuneOptions(), settings, Metrics(), on_failure=failures.append)
    with TestClient(create_app(worker)) as client:
        _wait_until(lambda: worker.state == READY, "ready")
        future = worker.submit(Generation("p", None, 64, 64, 2, None, seed=0, n=1))
        error = future.exception(timeout=30)  # answered, not left waiting for a dead thread
        assert isinstance(error, NotAcceptingError) and error.state == "failed"
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json() == {
            "status": "failed",
            "error": "RuntimeError: boom: a bug in the serving loop",
        }
        assert [str(err) for err in failures] == ["boom: a bug in the serving loop"]
        assert client.post("/generate", json={"prompt": "a cat"}).status_code == 503


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_the_report_shows_no_path_of_the_model_or_the_cache(
    relative: bool, session_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from autoquant import models
    from autoquant.execute.tuning import TuneOptions
    from autoquant.serve.app import create_app
    from autoquant.serve.worker import READY, Worker, WorkerSettings

    builtin = models.materialize(models.resolve("builtin:tiny-sd"), progress=False)
    # Names a pattern for paths cuts short: a space and a comma.
    folder = tmp_path / "my models, v2" / "tiny sd"
    shutil.copytree(builtin, folder)
    cache = tmp_path / "cache, for serving"
    cache.symlink_to(session_cache)  # the session's cache, under such a name
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)
    spec = "my models, v2/tiny sd" if relative else str(folder)
    options = TuneOptions(model=spec, device="cpu", progress=False)
    worker = Worker(options, WorkerSettings(), Metrics())
    with TestClient(create_app(worker)) as client:
        _wait_until(lambda: worker.state != "tuning", "tuned")
        assert worker.state == READY, worker.error
        text = client.get("/report").text
    report = json.loads(text)
    assert report["model"] == report["plan"]["model"] == "<path>"
    assert report["cache"]["path"] == "<path>" and report["chosen"]["label"]
    for private in (str(folder), "my models", "tiny sd", "cache, for", str(session_cache)):
        assert private not in text


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("", "application/json"),
        ("*/*", "application/json"),
        ("application/json", "application/json"),
        ("image/png", "image/png"),
        ("image/*", "image/png"),
        ("IMAGE/PNG; charset=binary", "image/png"),
        ("image/png;q=0.5, application/json", "application/json"),
        ("application/json;q=0.1, image/png", "image/png"),
        # A browser's: both only through */*, a tie, which JSON takes.
        ("text/html,application/xhtml+xml,image/webp,*/*;q=0.8", "application/json"),
        ("image/png, */*;q=0", "image/png"),
        ("text/html", None),
        ("application/json;q=0, image/png;q=0", None),
        ("image/png;q=lots", None),
    ],
)
def test_the_response_type_follows_the_accept_header_alone(
    accept: str | None, expected: str | None
) -> None:
    from autoquant.serve.app import response_type

    assert response_type(accept) == expected


def _painting_worker() -> Any:
    """A worker that is ready at once and answers each generation with n flat images of its
    size (image i has red = i), recording what it was given: /generate's answer types are
    under test, not a pipeline."""
    from PIL import Image

    from autoquant.execute.tuning import TuneOptions
    from autoquant.serve.worker import READY, Worker, WorkerSettings

    class Painting(Worker):
        state = READY
        default_size = (64, 64)

        def start(self) -> None:
            self.submitted: list[Generation] = []

        def refusal(self, generation: Generation) -> None:
            return None

        def submit(self, generation: Generation) -> Future[list[Any]]:
            self.submitted.append(generation)
            done: Future[list[Any]] = Future()
            size = (generation.width, generation.height)
            done.set_result([Image.new("RGB", size, (i, 0, 0)) for i in range(generation.n)])
            return done

    return Painting(TuneOptions(), WorkerSettings(), Metrics())


def test_generate_answers_one_type_per_accept_header() -> None:
    from fastapi.testclient import TestClient

    from autoquant.serve.app import create_app

    worker = _painting_worker()
    with TestClient(create_app(worker)) as client:
        body = {"prompt": "a cat", "seed": 5, "width": 64, "height": 128}
        del client.headers["accept"]  # no Accept at all: JSON, like */*
        for n in (1, 3):
            answer = client.post("/generate", json={**body, "n": n})
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "application/json"
            assert answer.headers["x-seed"] == "5" and answer.headers["vary"] == "Accept"
            data = answer.json()
            assert (data["seed"], data["width"], data["height"]) == (5, 64, 128)
            images = [base64.b64decode(image) for image in data["images"]]
            assert [_png_size(png) for png in images] == [(64, 128)] * n
            assert [int(_pixels(png)[0, 0, 0]) for png in images] == list(range(n))
        for accept in ("*/*", "application/json"):
            answer = client.post("/generate", json=body, headers={"accept": accept})
            assert answer.headers["content-type"] == "application/json"
            assert len(answer.json()["images"]) == 1

        png = client.post("/generate", json=body, headers={"accept": "image/png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.headers["x-seed"] == "5" and _png_size(png.content) == (64, 128)

        runs = len(worker.submitted)
        many = client.post("/generate", json={**body, "n": 2}, headers={"accept": "image/png"})
        assert many.status_code == 406
        assert many.json()["detail"] == (
            "Accept: image/png carries one image and n is 2: ask for application/json "
            "(base64 PNGs) or n = 1"
        )
        neither = client.post("/generate", json=body, headers={"accept": "text/html"})
        assert neither.status_code == 406
        assert "neither application/json nor image/png" in neither.json()["detail"]
        assert len(worker.submitted) == runs  # refused before anything was queued
        metrics = client.get("/metrics").text
        assert 'autoquant_requests_total{status="406"} 2' in metrics
