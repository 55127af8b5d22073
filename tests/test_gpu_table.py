"""The GPU table (profiles/gpus.yaml, probe/gpu_table.py): its shipped rows, lookups, a broken
file's errors, and planning for a named card (`--gpu`, `hardware.gpu`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_probe import FakeNvml, nvidia, run_probe
from test_validation import aq_light

from autoquant.cli.main import main
from autoquant.core.errors import AutoquantError, ConfigError
from autoquant.probe import find_gpu, load_gpu_table, spec_for
from autoquant.probe.emulate import CAPABILITY
from autoquant.probe.gpu_table import GpuSpec
from autoquant.probe.types import GpuInfo

GiB = 1024**3
MiB = 1024**2
SHIPPED = load_gpu_table()

# --- the shipped rows ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SHIPPED, ids=[s.name for s in SHIPPED])
def test_every_shipped_row_is_consistent(spec: GpuSpec) -> None:
    assert CAPABILITY.match(spec.compute_capability)
    card = GpuInfo(spec.name, spec.memory_bytes, spec.memory_bytes, spec.compute_capability)
    # A figure the card's tensor cores cannot have: bf16 before Ampere, fp8 before Ada.
    assert card.bf16 or spec.bf16_tflops is None
    assert card.fp8 or spec.fp8_tflops is None
    # bf16 and fp16 (FP32 accumulate) run at one rate on every NVIDIA tensor core that has both,
    # and int8 at least at the fp16 rate: a row breaking either is a transcription slip.
    if spec.bf16_tflops is not None and spec.fp16_tflops is not None:
        assert spec.bf16_tflops == spec.fp16_tflops
    if spec.int8_tops is not None and spec.fp16_tflops is not None:
        assert spec.int8_tops >= spec.fp16_tflops
    if spec.pcie_lanes is not None:
        assert spec.pcie_gen is not None and spec.pcie_lanes in (1, 2, 4, 8, 16)
    # The size a name or alias states ("RTX 3060 12GB", "A100-SXM4-40GB", "H200 141GB") is the
    # card's memory, within the rounding of a marketed figure.
    sizes = {int(size) for label in spec.labels for size in re.findall(r"(\d+)\s*GB", label)}
    assert len(sizes) <= 1, sizes
    for size in sizes:
        assert spec.memory_bytes / GiB == pytest.approx(size, rel=0.02)


def test_names_and_aliases_are_unique_across_rows() -> None:
    labels = [label.casefold() for spec in SHIPPED for label in spec.labels]
    assert len(labels) == len(set(labels))


# The cards the table must hold: (what a user types, memory in GiB, compute capability).
REQUIRED = [
    ("RTX 3060 12GB", 12, "8.6"),
    ("RTX 3080 10GB", 10, "8.6"),
    ("RTX 3090", 24, "8.6"),
    ("RTX 4060", 8, "8.9"),
    ("RTX 4060 Ti 16GB", 16, "8.9"),
    ("RTX 4070", 12, "8.9"),
    ("RTX 4080", 16, "8.9"),
    ("RTX 4090", 24, "8.9"),
    ("RTX 5090", 32, "12.0"),
    ("A10G", 24, "8.6"),
    ("L4", 24, "8.9"),
    ("L40S", 48, "8.9"),
    ("A100 40GB", 40, "8.0"),
    ("A100 80GB", 80, "8.0"),
    ("H100 SXM", 80, "9.0"),
    ("H100 PCIe", 80, "9.0"),
    ("H200", 143771 * MiB / GiB, "9.0"),
    ("T4", 16, "7.5"),
    ("V100 16GB", 16, "7.0"),
]


@pytest.mark.parametrize(("typed", "gib", "capability"), REQUIRED, ids=[r[0] for r in REQUIRED])
def test_required_cards_are_in_the_table(typed: str, gib: float, capability: str) -> None:
    spec = find_gpu(typed)
    assert spec.memory_bytes == int(gib * GiB)
    assert spec.compute_capability == capability


def test_the_h200_row_is_the_lent_cards_reading() -> None:
    spec = find_gpu("H200")
    assert (spec.name, spec.memory_bytes, spec.compute_capability) == (
        "NVIDIA H200",
        143771 * MiB,
        "9.0",
    )


# --- lookups -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "name"),
    [
        ("NVIDIA GeForce RTX 4060", "NVIDIA GeForce RTX 4060"),
        ("nvidia geforce rtx 4060", "NVIDIA GeForce RTX 4060"),
        ("RTX 4060", "NVIDIA GeForce RTX 4060"),
        ("4060", "NVIDIA GeForce RTX 4060"),
        ("  rtx 4060 ti ", "NVIDIA GeForce RTX 4060 Ti"),
        ("h100", "NVIDIA H100 80GB HBM3"),
        ("H100 pcie", "NVIDIA H100 PCIe"),
        ("a100-sxm4-80gb", "NVIDIA A100-SXM4-80GB"),
    ],
)
def test_find_by_name_or_alias_in_any_case(typed: str, name: str) -> None:
    assert find_gpu(typed).name == name


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("RTX 4061", "did you mean 'RTX 4060'"),
        ("H300", "'H200'"),
        ("banana", "known: RTX 3060, "),
    ],
)
def test_an_unknown_name_is_one_line_with_suggestions(typed: str, expected: str) -> None:
    with pytest.raises(AutoquantError) as caught:
        find_gpu(typed)
    message = str(caught.value)
    assert f"unknown GPU {typed!r}" in message and expected in message
    assert "\n" not in message


def test_spec_for_a_probed_h200() -> None:
    profile = run_probe(nvml=FakeNvml([nvidia("NVIDIA H200", 140.4, 140, "9.0")]))
    assert profile.primary_gpu is not None
    spec = spec_for(profile.primary_gpu)
    assert spec is not None and spec.name == "NVIDIA H200"
    assert spec.bandwidth_gb_s == 4800 and spec.bf16_tflops == 989.5
    assert spec_for(GpuInfo("NVIDIA Made-up 9000", GiB, GiB, "9.0")) is None


def test_probe_with_a_named_card_replaces_the_real_gpus() -> None:
    real = FakeNvml([nvidia("NVIDIA H100 80GB HBM3", 80, 79, "9.0")] * 2)
    profile = run_probe(nvml=real, gpu="RTX 4060")
    assert [(g.name, g.total_bytes, g.compute_capability) for g in profile.gpus] == [
        ("NVIDIA GeForce RTX 4060", 8 * GiB, "8.9")
    ]
    assert profile.accelerator == "cuda" and "accelerator" not in profile.emulated
    assert "gpus[0].name" in profile.emulated
    with pytest.raises(AutoquantError, match="give no vram, device or compute capability"):
        run_probe(nvml=real, gpu="RTX 4060", vram=GiB)


# --- a malformed table ---------------------------------------------------------------------------


def _row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": "Made-up GPU",
        "aliases": ["MUG"],
        "memory": "8GiB",
        "compute_capability": "8.9",
        "bandwidth_gb_s": 100,
        "fp16_tflops": 10.5,
        "bf16_tflops": 10.5,
        "fp8_tflops": None,
        "int8_tops": 21,
        "nvlink_gb_s": None,
        "pcie_gen": 4,
        "pcie_lanes": 8,
    }
    row.update(changes)
    return {k: v for k, v in row.items() if v != "<drop>"}


MALFORMED: list[tuple[str, str, str]] = [
    ("not-a-list", "a: 1\n", ":1: the GPU table must be a list of cards"),
    ("bad-yaml", "- name: [unclosed\n", "malformed YAML"),
    ("not-a-mapping", yaml.safe_dump([3]), "card 1: a card must be a mapping"),
    ("no-name", yaml.safe_dump([_row(name=None)]), "'name' must be the card's name"),
    ("missing", yaml.safe_dump([_row(fp8_tflops="<drop>")]), "(Made-up GPU): missing 'fp8_tflops'"),
    (
        "typo",
        yaml.safe_dump([_row(bandwith_gb_s=1)]),
        "unknown key 'bandwith_gb_s'; did you mean 'bandwidth_gb_s'?",
    ),
    ("negative", yaml.safe_dump([_row(int8_tops=-1)]), "'int8_tops' must be null or a number"),
    ("fraction", yaml.safe_dump([_row(pcie_lanes=8.5)]), "'pcie_lanes' must be null or a whole"),
    ("boolean", yaml.safe_dump([_row(bandwidth_gb_s=True)]), "'bandwidth_gb_s' must be null"),
    ("float-cc", yaml.safe_dump([_row(compute_capability=8.9)]), "must be a quoted MAJOR.MINOR"),
    ("memory", yaml.safe_dump([_row(memory="eight")]), "'memory': cannot read size 'eight'"),
    ("aliases", yaml.safe_dump([_row(aliases=[4060])]), "'aliases' must be a list of names"),
    (
        "duplicate",
        yaml.safe_dump([_row(), _row(name="Other GPU", aliases=["mug"])]),
        "card 2 (Other GPU): 'mug' already names 'Made-up GPU'",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_table_is_one_line_naming_file_and_card(
    tmp_path: Path, case: str, text: str, expected: str
) -> None:
    path = tmp_path / "gpus.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_gpu_table(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and expected in message, message
    assert "\n" not in message


def test_a_well_formed_made_up_table_loads(tmp_path: Path) -> None:
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump([_row()]))
    (spec,) = load_gpu_table(path)
    assert (spec.memory_bytes, spec.int8_tops, spec.fp8_tflops) == (8 * GiB, 21, None)
    assert find_gpu("mug", (spec,)) is spec


# --- the commands --------------------------------------------------------------------------------


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("args", "name", "gib", "capability", "dtype"),
    [
        (["--gpu", "RTX 4060"], "NVIDIA GeForce RTX 4060", 8, "8.9", "bf16"),
        (["--set", "hardware.gpu=T4"], "Tesla T4", 16, "7.5", "fp16"),
        # The flag wins over the profile key, as --vram does over hardware.vram.
        (["--set", "hardware.gpu=T4", "--gpu", "l4"], "NVIDIA L4", 24, "8.9", "bf16"),
    ],
)
def test_plan_for_a_named_card(
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    name: str,
    gib: int,
    capability: str,
    dtype: str,
) -> None:
    data = _plan(capsys, *args)
    (gpu,) = data["probe"]["gpus"]
    assert (gpu["name"], gpu["total_bytes"], gpu["compute_capability"]) == (
        name,
        gib * GiB,
        capability,
    )
    assert data["device"].startswith("cuda") and 0 < data["budget_bytes"] <= gib * GiB
    assert any(f"compute dtype {dtype}" in step for step in data["path"]), data["path"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["plan", "--gpu", "RTX 4060", "--vram", "8GB"], "drop --vram"),
        (["plan", "--gpu", "RTX 4060", "--device", "cuda"], "drop --device"),
        (
            ["probe", "--gpu", "RTX 4060", "--compute-capability", "8.9"],
            "drop --compute-capability",
        ),
        (["probe", "--gpu", "RTX 4061"], "did you mean 'RTX 4060'"),
        (
            ["plan", "--set", "hardware.gpu=T4", "--set", "hardware.vram=8GB"],
            "hardware.gpu names a card with its memory and capability; drop hardware.vram",
        ),
        (["plan", "--set", "hardware.gpu=banana"], "unknown GPU 'banana'"),
        (["plan", "--set", "hardware.gpu=4"], "'hardware.gpu' must be str"),
    ],
)
def test_bad_gpu_input_is_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_an_unknown_gpu_fails_before_heavy_imports(tmp_path: Path) -> None:
    proc = aq_light("plan", "--gpu", "RTX 4061", cache=tmp_path / "cache")
    assert proc.returncode == 2 and "unknown GPU 'RTX 4061'" in proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_probe_names_the_card(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert "GPU 0: NVIDIA H200 — 140.40 GiB total" in out
    assert "(emulated: name, total, free, compute capability)" in out
