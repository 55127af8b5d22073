"""`autoquant serve --ray`: one local Ray cluster for the module (in this process, 2 CPUs, Ray
Serve's proxy on a loopback port), builtin:tiny-sd replicas on the CPU at 64x64, 2 steps.
The load is driven by scripts/ray_loadtest.py's functions, the ones docs/scaling.md's figures
come from."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

# The ray extra is part of the suite (scripts/setup --dev installs it): a missing one fails the
# collection here instead of skipping these tests.
import ray

from autoquant.serve.app import fidelity_refusal
from autoquant.serve.schema import GenerateRequest

REPO = Path(__file__).resolve().parents[1]
SIZE, STEPS = 64, 2
TIMEOUT = 60.0  # seconds any one request may take here; none comes near it unless it hangs


def _loadtest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ray_loadtest", REPO / "scripts/ray_loadtest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


loadtest = _loadtest()


@pytest.fixture(scope="module")
def url(session_cache: Path, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[str]:
    # The replicas' processes take the cache folder from this one's environment.
    monkeypatch_module.setenv("AUTOQUANT_CACHE_DIR", str(session_cache))
    with loadtest.local_cluster(cpus=2) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _deploy(replicas: int) -> None:
    loadtest.deploy(replicas, model="builtin:tiny-sd", size=SIZE)


def _load(url: str, replicas: int, requests: int = 16) -> Any:
    return loadtest.load(
        url, replicas, requests=requests, concurrency=8, steps=STEPS, timeout=TIMEOUT
    )


def _replica_actors() -> dict[str, str]:
    """Replica id → its actor's name, from Ray's public list of named actors."""
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    return {name.rpartition("#")[2]: name for name in names if name.startswith("SERVE_REPLICA")}


def test_two_replicas_serve_the_native_and_openai_apis(url: str) -> None:
    _deploy(1)
    one = _load(url, 1)
    _deploy(2)
    two = _load(url, 2)
    print(f"\nimages/s: 1 replica {one.images_per_second}, 2 replicas {two.images_per_second}")
    assert one.statuses == {200: 16} and len(one.replicas_seen) == 1
    assert two.statuses == {200: 16}
    assert sorted(two.replicas_seen) == sorted(_replica_actors()), "both replicas answered"

    # Each replica says which it is and what plan it runs, in /report and in /metrics.
    report = httpx.get(f"{url}/report", timeout=TIMEOUT)
    assert report.json()["replica"] == report.headers["x-autoquant-replica"]
    assert report.json()["model"] == "builtin:tiny-sd"
    metrics = httpx.get(f"{url}/metrics", timeout=TIMEOUT)
    replica, chosen = metrics.headers["x-autoquant-replica"], report.json()["chosen"]
    assert f'autoquant_replica_info{{replica="{replica}",plan="' in metrics.text
    # The tiny model on the CPU runs in bf16 class: the best class asked for is served.
    assert chosen["fidelity"] == "bf16"
    served = httpx.post(
        f"{url}/generate",
        json={"prompt": "a cat", "steps": STEPS, "fidelity": "bf16", "seed": 1},
        timeout=TIMEOUT,
    )
    assert served.status_code == 200
    bad = httpx.post(f"{url}/generate", json={"prompt": "a", "fidelity": "fp4"}, timeout=TIMEOUT)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "fidelity"

    # The OpenAI images API goes through the same replicas.
    openai = httpx.post(
        f"{url}/v1/images/generations",
        json={"prompt": "a cat", "size": f"{SIZE}x{SIZE}", "response_format": "b64_json"},
        timeout=TIMEOUT,
    )
    assert openai.status_code == 200 and len(openai.json()["data"]) == 1


def test_a_killed_replica_is_replaced_and_no_request_hangs(url: str) -> None:
    _deploy(2)
    before = _replica_actors()
    victim = sorted(before)[0]
    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(loadtest.generate, url, seed, STEPS, TIMEOUT) for seed in range(16)]
        time.sleep(0.3)  # requests are queued and running on both replicas
        ray.kill(ray.get_actor(before[victim], namespace="serve"))
        statuses = [future.result()[0] for future in answers]
    # Every request was answered (none hung: 0 would be a timeout). Ray Serve's proxy answers
    # 500 for a request that was running on the killed replica (the actor died under it), routes
    # the queued ones to the other, and 503 means unavailable; a client retries either.
    assert 0 not in statuses, statuses
    assert set(statuses) <= {200, 500, 503}, statuses
    assert statuses.count(200) >= 8, statuses  # the survivor's share and the rerouted ones
    # Ray's controller notices the death at its next health check and starts a replacement.
    deadline = time.monotonic() + 120
    while not (victim not in (after := _replica_actors()) and len(after) == 2):
        assert time.monotonic() < deadline, f"not replaced: {before} → {after}"
        time.sleep(0.5)
    loadtest.wait_for_replicas(2, timeout=120)
    retried = [
        loadtest.generate(url, seed, STEPS, TIMEOUT)[0]
        for seed, status in enumerate(statuses)
        if status != 200
    ]
    assert all(status == 200 for status in retried), retried
    again = _load(url, 2, requests=8)
    assert again.statuses == {200: 8}


def test_fidelity_refusal_reads_the_plans_class() -> None:
    report = {"chosen": {"label": "torchao int4", "fidelity": "4bit"}}
    assert fidelity_refusal(None, report) is None
    assert fidelity_refusal("4bit", report) is None
    assert fidelity_refusal("int8", report) == (
        "fidelity int8 asked for: this server runs torchao int4, of the 4bit class"
    )
    assert fidelity_refusal("int8", {"chosen": {"label": "bf16", "fidelity": "bf16"}}) is None
    assert GenerateRequest(prompt="a", fidelity="int8").fidelity == "int8"


def test_ray_flags_are_checked_before_anything_runs(tmp_path: Path) -> None:
    def serve_cli(*args: str, hide_ray: bool = False) -> subprocess.CompletedProcess[str]:
        hide = "sys.modules['ray'] = None; " if hide_ray else ""
        script = (
            f"import sys; {hide}from autoquant.cli.main import main; sys.exit(main(sys.argv[1:]))"
        )
        command = [sys.executable, "-c", script, "serve", "--model", "builtin:tiny-sd", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)

    missing = serve_cli("--ray", hide_ray=True)
    assert missing.returncode == 2
    assert "pip install 'autoquant-diffusers[ray]'" in missing.stderr
    assert "Traceback" not in missing.stderr
    alone = serve_cli("--replicas", "2")
    assert alone.returncode == 2 and "--replicas needs --ray" in alone.stderr
    zero = serve_cli("--ray", "--replicas", "0")
    assert zero.returncode == 2 and "--replicas" in zero.stderr
