"""`autoquant serve` with a compiled plan (builtin:tiny-sd, `--compile always`, on the CPU): every
image count a call may have warmed up at every served size before /health says ready, another
size refused, and the graphs torch compiles after the warm-up counted in /metrics and /report;
then torch's own counter and the `--sizes` flag on their own."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_serve import (
    REPO,
    Server,
    _free_port,
    _generate,
    _metrics,
    _png_size,
    _start,
    _wait_until_ready,
)

from autoquant.serve.worker import compiled_graphs

# A CPU compile of a tiny-sd block takes 11-29 s cold on 2 vCPUs; tuning and warm-up compile four.
READY_TIMEOUT = 400
QUICK = {"steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def server(session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve-compile") / "server.log"
    args = ["--compile", "always", "--sizes", "128x128", "--max-batch", "4"]
    started = _start(session_cache, log, *args, "--max-request-seconds", "1000")
    try:
        _wait_until_ready(started, timeout=READY_TIMEOUT)
        yield started
    finally:
        if started.process.poll() is None:
            started.process.kill()
            started.process.wait()


def test_no_request_at_a_served_size_recompiles_after_the_warm_up(server: Server) -> None:
    before = _metrics(server)
    assert before["autoquant_warmup_compiles"] >= 1 and before["autoquant_warmup_seconds"] > 0
    bodies = [(1, 64), (2, 64), (3, 64), (1, 128)]
    with ThreadPoolExecutor(len(bodies)) as pool:  # together: they batch as they come
        calls = [
            (
                n,
                side,
                pool.submit(_generate, server, prompt="a", n=n, width=side, height=side, **QUICK),
            )
            for n, side in bodies
        ]
        for n, side, call in calls:
            answer = call.result()
            assert answer.status_code == 200, answer.text
            pngs = [base64.b64decode(image) for image in answer.json()["images"]]
            assert [_png_size(png) for png in pngs] == [(side, side)] * n
    after = _metrics(server)
    assert after["autoquant_recompiles_total"] == 0, server.log_tail()
    assert after["autoquant_images_total"] - before["autoquant_images_total"] == 7


def test_a_size_not_warmed_up_is_refused_naming_the_served_ones(server: Server) -> None:
    answer = _generate(server, prompt="a lighthouse", width=96, height=96, **QUICK)
    assert answer.status_code == 422
    assert "64x64, 128x128" in answer.json()["detail"]
    openai = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"prompt": "a lighthouse", "size": "96x96"},
        timeout=60,
    )
    assert openai.status_code == 422 and "64x64" in openai.json()["error"]["message"]
    assert _metrics(server)["autoquant_recompiles_total"] == 0


def test_the_report_names_the_image_counts_the_sizes_and_the_warm_up(server: Server) -> None:
    shapes = httpx.get(f"{server.url}/report", timeout=10).json()["shapes"]
    # --max-batch 4 forms batches of 4 at most; a lone request may still ask for 8 images.
    assert shapes["most_images"] == 8
    assert shapes["sizes"] == ["64x64", "128x128"]
    assert shapes["warmup_compiles"] == _metrics(server)["autoquant_warmup_compiles"]
    assert shapes["recompiles"] == 0


def test_a_restart_on_a_fresh_machine_loads_the_warm_ups_graphs_from_the_compile_cache(
    server: Server, session_cache: Path, tmp_path: Path
) -> None:
    # The first server (the fixture) saved its warm-up's graphs in autoquant's cache. A second
    # start with that cache but an empty inductor cache (a fresh machine's /tmp) generates no
    # graph in its warm-up: each comes from the saved compile cache.
    first = httpx.get(f"{server.url}/report", timeout=10).json()["shapes"]
    args = ["--compile", "always", "--sizes", "128x128", "--max-batch", "4"]
    fresh = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    second = _start(session_cache, tmp_path / "server.log", *args, env=fresh)
    try:
        _wait_until_ready(second, timeout=READY_TIMEOUT)
        shapes = httpx.get(f"{second.url}/report", timeout=10).json()["shapes"]
    finally:
        second.process.kill()
        second.process.wait()
    assert shapes["warmup_compiles"] == first["warmup_compiles"] >= 1, second.log_tail()
    assert shapes["warmup_compile_cache"]["misses"] == 0, second.log_tail()
    assert shapes["warmup_compile_cache"]["hits"] >= 1


def test_torch_counts_every_graph_it_compiles_a_recompile_included() -> None:
    import torch

    def affine(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    compiled = torch.compile(affine, backend="eager")  # dynamo's count needs no inductor
    start = compiled_graphs()
    compiled(torch.ones(2))
    compiled(torch.ones(2))
    assert compiled_graphs() == start + 1
    compiled(torch.ones(3))  # a new shape: a recompile, dynamic in its length from now on
    compiled(torch.ones(5))
    assert compiled_graphs() == start + 2
    torch._dynamo.reset()  # what memory.free() does: the count stays, the graphs go
    compiled(torch.ones(5))
    assert compiled_graphs() == start + 3


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ("64x64,100x100", "argument --sizes: size '100x100': width and height must each be"),
        ("64x64,72x72,80x80,88x88,96x96", "argument --sizes: '64x64,72x72,80x80,88x88,96x96': 4"),
    ],
)
def test_bad_sizes_are_one_line_usage_errors(
    sizes: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from autoquant.cli.main import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--sizes", sizes])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"autoquant serve: error: {message}")


def test_a_size_outside_the_bounds_is_a_one_line_error(session_cache: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", AUTOQUANT_CACHE_DIR=str(session_cache))
    command = [sys.executable, "-m", "autoquant", "serve", "--sizes", "64x64,4096x64"]
    command += ["--port", str(_free_port())]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == "autoquant: error: --sizes 4096x64 is outside --min-side 64 .. --max-side 2048"
