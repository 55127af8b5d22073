"""The hardware probe on made-up devices: fake NVML and torch modules, no GPU needed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from machines import INSTALLED

from autoquant.core.errors import AutoquantError
from autoquant.probe import HostFacts, describe, emulate, probe
from autoquant.probe.backends import assess_backends
from autoquant.probe.host import disk_free_bytes, parse_cpuinfo
from autoquant.probe.nvidia import visible_nvml_indices
from autoquant.probe.types import CpuInfo, HardwareProfile

GiB = 1024**3

HOST = HostFacts(
    cpu=CpuInfo(model="Made-up CPU", cores=8, flags=("avx2", "fma")),
    ram_total_bytes=64 * GiB,
    ram_available_bytes=48 * GiB,
    disk_free_bytes=500 * GiB,
)
ALL_INSTALLED = INSTALLED


# --- fakes ---------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


class FakeNVMLLibraryNotFound(FakeNVMLError):
    pass


@dataclass
class FakeNvidiaGpu:
    name: str
    total: int
    free: int
    capability: tuple[int, int]


@dataclass
class FakeNvml:
    """The pynvml calls the probe makes; ``fail_at`` names the call that raises."""

    gpus: list[FakeNvidiaGpu]
    driver: str = "570.86.15"
    fail_at: str | None = None
    name_as_bytes: bool = False
    NVMLError = FakeNVMLError
    NVMLError_LibraryNotFound = FakeNVMLLibraryNotFound

    def _call(self, name: str) -> None:
        if name == self.fail_at:
            raise FakeNVMLError(f"{name} failed")

    def nvmlInit(self) -> None:
        if self.fail_at == "nvmlInit":
            raise FakeNVMLLibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeNvidiaGpu:
        self._call("nvmlDeviceGetHandleByIndex")
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: FakeNvidiaGpu) -> str | bytes:
        self._call("nvmlDeviceGetName")
        return handle.name.encode() if self.name_as_bytes else handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeNvidiaGpu) -> SimpleNamespace:
        self._call("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(
            total=handle.total, free=handle.free, used=handle.total - handle.free
        )

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeNvidiaGpu) -> tuple[int, int]:
        self._call("nvmlDeviceGetCudaComputeCapability")
        return handle.capability

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call("nvmlSystemGetDriverVersion")
        return self.driver


NO_NVML = FakeNvml(gpus=[], fail_at="nvmlInit")


@dataclass
class FakeTorchGpu:
    name: str
    total_memory: int
    free: int
    major: int = 0
    minor: int = 0


def fake_torch(
    cuda_gpus: tuple[FakeTorchGpu, ...] = (),
    hip: str | None = None,
    mps_available: bool = False,
    mps_recommended_max_memory: int | None = None,
    xpu_gpus: tuple[FakeTorchGpu, ...] = (),
) -> SimpleNamespace:
    """The parts of torch the probe reads: version, cuda, backends.mps, mps and xpu."""
    mps = SimpleNamespace()
    if mps_recommended_max_memory is not None:
        mps.recommended_max_memory = lambda: mps_recommended_max_memory
    return SimpleNamespace(
        version=SimpleNamespace(hip=hip, cuda=None if hip else "12.8"),
        cuda=_fake_device_module(cuda_gpus),
        xpu=_fake_device_module(xpu_gpus),
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps_available)),
        mps=mps,
    )


def _fake_device_module(gpus: tuple[FakeTorchGpu, ...]) -> SimpleNamespace:
    return SimpleNamespace(
        is_available=lambda: bool(gpus),
        device_count=lambda: len(gpus),
        get_device_properties=lambda i: gpus[i],
        mem_get_info=lambda i: (gpus[i].free, gpus[i].total_memory),
    )


class TorchSpy:
    """Records any use: proves torch was not consulted."""

    def __init__(self) -> None:
        self.touched = False

    def __getattr__(self, name: str) -> Any:
        self.touched = True
        raise AttributeError(name)


def run_probe(**kwargs: Any) -> HardwareProfile:
    kwargs.setdefault("host", HOST)
    kwargs.setdefault("packages", ALL_INSTALLED)
    kwargs.setdefault("environ", {})
    return probe(**kwargs)


def nvidia(name: str, total_gib: float, free_gib: float, capability: str) -> FakeNvidiaGpu:
    major, minor = capability.split(".")
    return FakeNvidiaGpu(name, int(total_gib * GiB), int(free_gib * GiB), (int(major), int(minor)))


# --- detection -----------------------------------------------------------------------------------


def test_no_gpu_gives_cpu() -> None:
    profile = run_probe(nvml=NO_NVML, torch_module=fake_torch())
    assert profile.accelerator == "cpu"
    assert profile.gpus == ()
    assert not profile.has_gpu
    assert profile.driver is None
    assert profile.cpu == HOST.cpu
    assert (profile.ram_total_bytes, profile.disk_free_bytes) == (64 * GiB, 500 * GiB)


@pytest.mark.parametrize(
    ("name", "capability", "arch", "bf16", "fp8"),
    [
        ("NVIDIA GeForce RTX 2080 Ti", "7.5", "Turing", False, False),
        ("NVIDIA A100-SXM4-80GB", "8.0", "Ampere", True, False),
        ("NVIDIA GeForce RTX 3090", "8.6", "Ampere", True, False),
        ("NVIDIA GeForce RTX 4090", "8.9", "Ada", True, True),
        ("NVIDIA H100 80GB HBM3", "9.0", "Hopper", True, True),
        ("NVIDIA B200", "10.0", "Blackwell", True, True),
        ("NVIDIA GeForce RTX 5090", "12.0", "Blackwell", True, True),
    ],
)
def test_one_nvidia_gpu_per_architecture(
    name: str, capability: str, arch: str, bf16: bool, fp8: bool
) -> None:
    spy = TorchSpy()
    profile = run_probe(nvml=FakeNvml([nvidia(name, 24, 20, capability)]), torch_module=spy)
    assert not spy.touched, "torch must not be consulted when NVML answers"
    assert profile.accelerator == "cuda"
    assert profile.driver == "570.86.15"
    (gpu,) = profile.gpus
    assert (gpu.name, gpu.total_bytes, gpu.free_bytes) == (name, 24 * GiB, 20 * GiB)
    assert (gpu.compute_capability, gpu.arch, gpu.bf16, gpu.fp8) == (capability, arch, bf16, fp8)
    assert profile.bf16 == bf16
    assert profile.backend_usable("bitsandbytes")


def test_nvml_names_as_bytes_are_decoded() -> None:
    fake = FakeNvml([nvidia("NVIDIA L4", 22, 22, "8.9")], name_as_bytes=True)
    assert run_probe(nvml=fake).gpus[0].name == "NVIDIA L4"


def test_two_gpus_primary_is_the_largest() -> None:
    fake = FakeNvml(
        [
            nvidia("NVIDIA GeForce RTX 3060", 12, 11, "8.6"),
            nvidia("NVIDIA RTX A5000", 24, 23, "8.6"),
        ]
    )
    profile = run_probe(nvml=fake)
    assert [g.index for g in profile.gpus] == [0, 1]
    assert profile.primary_gpu is not None
    assert profile.primary_gpu.name == "NVIDIA RTX A5000"


@pytest.mark.parametrize(
    ("setting", "count", "expected"),
    [
        (None, 3, [0, 1, 2]),
        ("2,0", 3, [2, 0]),
        (" 1 , 2 ", 3, [1, 2]),
        ("", 3, []),
        ("-1", 3, []),
        ("1,7,0", 3, [1]),  # CUDA stops at the first invalid entry
        ("0,0", 3, [0]),
        ("GPU-5d1c1b7e-8f4a", 3, None),  # UUIDs: left to torch
    ],
)
def test_cuda_visible_devices(setting: str | None, count: int, expected: list[int] | None) -> None:
    assert visible_nvml_indices(setting, count) == expected


def test_cuda_visible_devices_restricts_and_reorders_nvml() -> None:
    fake = FakeNvml(
        [
            nvidia("NVIDIA A100-SXM4-40GB", 40, 39, "8.0"),
            nvidia("NVIDIA H100 80GB HBM3", 80, 79, "9.0"),
            nvidia("NVIDIA L40S", 48, 47, "8.9"),
        ]
    )
    profile = run_probe(nvml=fake, environ={"CUDA_VISIBLE_DEVICES": "2,1"})
    assert [(g.index, g.name) for g in profile.gpus] == [
        (0, "NVIDIA L40S"),
        (1, "NVIDIA H100 80GB HBM3"),
    ]


def test_cuda_visible_devices_uuid_falls_back_to_torch() -> None:
    fake = FakeNvml([nvidia("NVIDIA H100 80GB HBM3", 80, 79, "9.0")])
    torch = fake_torch(cuda_gpus=(FakeTorchGpu("NVIDIA H100 80GB HBM3", 80 * GiB, 70 * GiB, 9, 0),))
    profile = run_probe(nvml=fake, torch_module=torch, environ={"CUDA_VISIBLE_DEVICES": "GPU-5d1c"})
    assert profile.gpus[0].free_bytes == 70 * GiB  # torch's number, not NVML's


TORCH_H100 = fake_torch(
    cuda_gpus=(FakeTorchGpu("NVIDIA H100 80GB HBM3", 80 * GiB, 60 * GiB, 9, 0),)
)


@pytest.mark.parametrize(
    "fail_at",
    [
        "nvmlInit",
        "nvmlDeviceGetCount",
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetName",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetCudaComputeCapability",
        "nvmlSystemGetDriverVersion",
    ],
)
def test_nvml_failing_at_any_call_falls_back_to_torch(fail_at: str) -> None:
    fake = FakeNvml([nvidia("NVIDIA H100 80GB HBM3", 80, 79, "9.0")], fail_at=fail_at)
    profile = run_probe(nvml=fake, torch_module=TORCH_H100)
    assert profile.accelerator == "cuda"
    (gpu,) = profile.gpus
    assert (gpu.total_bytes, gpu.free_bytes, gpu.compute_capability) == (80 * GiB, 60 * GiB, "9.0")
    assert profile.driver is None  # torch knows no driver version


def test_nvml_shutdown_failing_keeps_the_answer() -> None:
    fake = FakeNvml([nvidia("NVIDIA H100 80GB HBM3", 80, 79, "9.0")], fail_at="nvmlShutdown")
    assert run_probe(nvml=fake).gpus[0].free_bytes == 79 * GiB


def test_pynvml_not_installed_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    profile = run_probe(torch_module=TORCH_H100)
    assert profile.accelerator == "cuda"
    assert profile.gpus[0].free_bytes == 60 * GiB


def test_torch_raising_gives_cpu() -> None:
    class BrokenCuda:
        def is_available(self) -> bool:
            raise RuntimeError("CUDA driver initialization failed")

    torch = fake_torch()
    torch.cuda = BrokenCuda()
    assert run_probe(nvml=NO_NVML, torch_module=torch).accelerator == "cpu"


@pytest.mark.parametrize(
    ("recommended", "total", "free"),
    [
        (None, 64 * GiB, 48 * GiB),  # older torch: the whole RAM
        (40 * GiB, 40 * GiB, 40 * GiB),  # Metal's working-set cap
    ],
)
def test_mps(recommended: int | None, total: int, free: int) -> None:
    torch = fake_torch(mps_available=True, mps_recommended_max_memory=recommended)
    profile = run_probe(nvml=NO_NVML, torch_module=torch)
    assert profile.accelerator == "mps"
    (gpu,) = profile.gpus
    assert (gpu.total_bytes, gpu.free_bytes, gpu.compute_capability) == (total, free, None)
    assert gpu.bf16 and not gpu.fp8
    status = profile.backends["bitsandbytes"]
    assert status.usable and status.reason is not None and "4-bit only" in status.reason


def test_rocm() -> None:
    torch = fake_torch(
        hip="6.3.42131",
        cuda_gpus=(FakeTorchGpu("AMD Instinct MI300X", 192 * GiB, 190 * GiB, 9, 4),),
    )
    profile = run_probe(nvml=NO_NVML, torch_module=torch)
    assert profile.accelerator == "rocm"
    (gpu,) = profile.gpus
    assert (gpu.name, gpu.total_bytes, gpu.compute_capability) == (
        "AMD Instinct MI300X",
        192 * GiB,
        None,
    )
    assert gpu.bf16  # gfx 9.4 must not be read as a CUDA capability
    assert profile.backend_usable("bitsandbytes")


def test_xpu() -> None:
    torch = fake_torch(
        xpu_gpus=(FakeTorchGpu("Intel(R) Data Center GPU Max 1550", 64 * GiB, 63 * GiB),)
    )
    profile = run_probe(nvml=NO_NVML, torch_module=torch)
    assert profile.accelerator == "xpu"
    assert profile.gpus[0].free_bytes == 63 * GiB


# --- emulation -----------------------------------------------------------------------------------

CPU_MACHINE = run_probe(nvml=NO_NVML, torch_module=fake_torch())
H100_MACHINE = run_probe(nvml=FakeNvml([nvidia("NVIDIA H100 80GB HBM3", 80, 70, "9.0")]))


def test_emulated_cuda_gpu_on_a_cpu_machine() -> None:
    profile = run_probe(nvml=NO_NVML, torch_module=fake_torch(), vram=int(8e9), device="cuda")
    assert profile.accelerator == "cuda"
    (gpu,) = profile.gpus
    assert (gpu.name, gpu.total_bytes, gpu.free_bytes) == (
        "Emulated CUDA GPU",
        8 * 10**9,
        8 * 10**9,
    )
    assert (gpu.compute_capability, gpu.arch) == ("8.6", "Ampere")
    assert profile.emulated == (
        "accelerator",
        "gpus[0].total_bytes",
        "gpus[0].free_bytes",
        "gpus[0].compute_capability",
    )
    assert not CPU_MACHINE.backend_usable("bitsandbytes")
    assert profile.backend_usable("bitsandbytes")


def test_emulated_cuda_gpu_takes_a_compute_capability() -> None:
    profile = emulate(CPU_MACHINE, vram=16 * GiB, device="cuda", compute_capability="8.9")
    assert profile.gpus[0].fp8


def test_emulated_cpu_on_a_gpu_machine() -> None:
    profile = emulate(H100_MACHINE, device="cpu")
    assert (profile.accelerator, profile.gpus, profile.driver) == ("cpu", (), None)
    assert profile.emulated == ("accelerator", "gpus")
    assert not profile.backend_usable("bitsandbytes")
    assert profile.backends["bitsandbytes"].installed


def test_vram_caps_a_real_gpu() -> None:
    smaller = emulate(H100_MACHINE, vram=24 * GiB)
    assert (smaller.gpus[0].total_bytes, smaller.gpus[0].free_bytes) == (24 * GiB, 24 * GiB)
    larger = emulate(H100_MACHINE, vram=141 * GiB)
    assert (larger.gpus[0].total_bytes, larger.gpus[0].free_bytes) == (141 * GiB, 70 * GiB)
    assert larger.emulated == ("gpus[0].total_bytes", "gpus[0].free_bytes")
    assert larger.backends == H100_MACHINE.backends


def test_emulated_mps_uses_host_ram_unless_sized() -> None:
    profile = emulate(CPU_MACHINE, device="mps")
    assert (profile.accelerator, profile.gpus[0].total_bytes) == ("mps", 64 * GiB)
    assert emulate(CPU_MACHINE, device="mps", vram=32 * GiB).gpus[0].free_bytes == 32 * GiB


def test_no_overrides_leave_the_profile_alone() -> None:
    assert emulate(H100_MACHINE) == H100_MACHINE


@pytest.mark.parametrize(
    ("machine", "overrides", "message"),
    [
        (
            CPU_MACHINE,
            {"device": "cuda"},
            "--device cuda on a machine without a CUDA GPU needs --vram SIZE",
        ),
        (CPU_MACHINE, {"device": "tpu"}, "unknown device 'tpu'"),
        (CPU_MACHINE, {"vram": 8 * GiB}, "--vram needs a GPU"),
        (CPU_MACHINE, {"vram": 0, "device": "cuda"}, "greater than zero"),
        (H100_MACHINE, {"device": "cpu", "vram": 8 * GiB}, "--device cpu takes neither"),
        (
            CPU_MACHINE,
            {"device": "cuda", "vram": GiB, "compute_capability": "sm_86"},
            "MAJOR.MINOR",
        ),
        (CPU_MACHINE, {"device": "mps", "compute_capability": "8.6"}, "applies to CUDA GPUs"),
    ],
)
def test_emulation_errors(
    machine: HardwareProfile, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(AutoquantError, match=re.escape(message)) as caught:
        emulate(machine, **overrides)
    assert "\n" not in str(caught.value)


# --- backends ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accelerator", "packages", "name", "installed", "usable", "reason_part"),
    [
        ("cpu", ALL_INSTALLED, "bitsandbytes", True, False, "on CPU use gguf, quanto or torchao"),
        ("cuda", ALL_INSTALLED, "bitsandbytes", True, True, None),
        ("xpu", ALL_INSTALLED, "bitsandbytes", True, True, None),
        ("mps", ALL_INSTALLED, "bitsandbytes", True, True, "4-bit only"),
        (
            "cuda",
            {**ALL_INSTALLED, "bitsandbytes": "0.42.0"},
            "bitsandbytes",
            True,
            False,
            ">= 0.43.3",
        ),
        ("cpu", ALL_INSTALLED, "optimum-quanto", True, True, "deprecated"),
        ("cpu", ALL_INSTALLED, "torchao", True, True, None),
        ("cpu", {**ALL_INSTALLED, "torchao": "0.12.0"}, "torchao", True, False, ">= 0.15.0"),
        ("cpu", ALL_INSTALLED, "gguf", True, True, "dequantizing"),
        ("cpu", ALL_INSTALLED, "diffusers", True, True, None),
        ("cpu", {**ALL_INSTALLED, "diffusers": "0.35.2"}, "diffusers", True, False, ">= 0.42"),
        ("cuda", {**ALL_INSTALLED, "diffusers": "0.35.2"}, "torchao", True, False, "diffusers"),
        ("cuda", {}, "bitsandbytes", False, False, "pip install 'autoquant-diffusers[bnb]'"),
        ("cpu", {}, "optimum-quanto", False, False, "pip install 'autoquant-diffusers[quanto]'"),
        ("cpu", {}, "torchao", False, False, "pip install 'autoquant-diffusers[torchao]'"),
        ("cpu", {}, "gguf", False, False, "pip install 'autoquant-diffusers[gguf]'"),
        ("cpu", {**ALL_INSTALLED, "diffusers": "0.42.0.dev0"}, "diffusers", True, True, None),
    ],
)
def test_backend_status(
    accelerator: Any,
    packages: dict[str, str | None],
    name: str,
    installed: bool,
    usable: bool,
    reason_part: str | None,
) -> None:
    statuses = assess_backends(accelerator, packages)
    assert list(statuses) == ["bitsandbytes", "optimum-quanto", "torchao", "gguf", "diffusers"]
    status = statuses[name]
    assert (status.installed, status.usable) == (installed, usable)
    assert status.version == packages.get(name)
    if reason_part is None:
        assert status.reason is None
    else:
        assert status.reason is not None and reason_part in status.reason


# --- host ----------------------------------------------------------------------------------------

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    ("text", "model", "flags"),
    [
        (
            X86_CPUINFO,
            "Intel(R) Xeon(R) Platinum 8480+",
            ("fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "amx_bf16"),
        ),
        (
            ARM_CPUINFO,
            None,
            ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "bf16"),
        ),
        ("", None, ()),
    ],
)
def test_parse_cpuinfo(text: str, model: str | None, flags: tuple[str, ...]) -> None:
    assert parse_cpuinfo(text) == (model, flags)


def test_disk_free_of_a_missing_folder_is_its_ancestors(tmp_path: Any) -> None:
    assert disk_free_bytes(tmp_path / "not" / "yet" / "there") > 0


# --- output --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "profile",
    [
        CPU_MACHINE,
        H100_MACHINE,
        emulate(CPU_MACHINE, vram=int(8e9), device="cuda"),
        run_probe(nvml=NO_NVML, torch_module=fake_torch(mps_available=True)),
    ],
)
def test_json_round_trip(profile: HardwareProfile) -> None:
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
    assert HardwareProfile.from_dict(json.loads(profile.to_json())) == profile


def test_describe_a_gpu_machine() -> None:
    lines = describe(H100_MACHINE).splitlines()
    assert lines[0] == "Accelerator: cuda, driver 570.86.15, torch 2.13.0"
    assert lines[1] == (
        "GPU 0: NVIDIA H100 80GB HBM3 — 80.00 GiB total, 70.00 GiB free, compute 9.0 (Hopper), "
        "bf16 yes, fp8 yes"
    )
    assert lines[2] == "CPU: Made-up CPU — 8 cores, bf16 units no"
    assert "  bitsandbytes 0.50.2: usable" in lines
    assert "(emulated" not in describe(H100_MACHINE)


def test_describe_marks_emulation() -> None:
    text = describe(emulate(CPU_MACHINE, vram=int(8e9), device="cuda"))
    assert "Accelerator: cuda (emulated)" in text
    assert "(emulated: total, free, compute capability)" in text
    assert "Backends (for the emulated hardware):" in text
    assert "GPU: none (emulated)" in describe(emulate(H100_MACHINE, device="cpu"))


# --- the real machine ----------------------------------------------------------------------------


def test_real_probe_on_this_machine() -> None:
    """Whatever this machine is: a CPU-only one has no GPU and no bitsandbytes; one with an
    accelerator reports each device with its memory."""
    profile = probe()
    assert profile.cpu.cores >= 1
    assert profile.ram_total_bytes > 0
    assert profile.backends["diffusers"].usable
    if profile.accelerator == "cpu":
        assert profile.gpus == ()
        assert not profile.backend_usable("bitsandbytes")
    else:
        assert profile.gpus and all(0 < g.free_bytes <= g.total_bytes for g in profile.gpus)


def test_probe_imports_no_backend() -> None:
    code = (
        "import autoquant.probe as p, sys, json; p.probe(); "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    imported = set(json.loads(result.stdout))
    assert not imported & {
        "diffusers",
        "bitsandbytes",
        "optimum",
        "torchao",
        "gguf",
        "transformers",
    }


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory.max": "8589934592\n", "memory.current": "1073741824\n"}, (8 * 2**30, 2**30)),
        ({"memory.max": "max\n", "memory.current": "1073741824\n"}, None),
        (
            {
                "memory/memory.limit_in_bytes": "4294967296\n",
                "memory/memory.usage_in_bytes": "1000\n",
            },
            (4 * 2**30, 1000),
        ),
        (
            {
                "memory/memory.limit_in_bytes": "9223372036854771712\n",
                "memory/memory.usage_in_bytes": "1000\n",
            },
            None,
        ),
        ({}, None),
    ],
    ids=["v2-limit", "v2-max", "v1-limit", "v1-unlimited", "none"],
)
def test_the_cgroup_memory_limit_is_read(
    tmp_path: Path, files: dict[str, str], expected: tuple[int, int] | None
) -> None:
    from autoquant.probe.host import cgroup_memory_limit

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    limit = cgroup_memory_limit(tmp_path)
    assert (None if limit is None else (limit.limit_bytes, limit.used_bytes)) == expected
