"""The seams between driver, trainer and fleet: one-way package dependency, the contracts satisfied,
no raw HTTP in the trainer package."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` statement in ``path`` names (top level or inside
    functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_rollout_sglang_imports_nothing_from_megatron_vespo():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "megatron_vespo")
                 for p in (REPO / "rollout_sglang").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}
    # ...and importing all of it (CPU server included) loads none of megatron_vespo.
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for p in (REPO / "rollout_sglang").rglob("*.py")
                     if p.name != "__main__.py" and p.stem != "ray_launcher")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('megatron_vespo')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_typed_config_is_a_leaf():
    assert {m.split(".")[0] for m in imported_modules(REPO / "typed_config" / "__init__.py")} \
        .isdisjoint({"megatron_vespo", "rollout_sglang"})


@pytest.mark.parametrize("forbidden", ["http_json", "call_all", "aiohttp", "urllib"])
def test_the_trainer_package_sends_no_raw_http(forbidden):
    """The driver talks to the fleet through its contracts (rollout_sglang/contracts.py) only. The remote
    verifier's client is the one exception: it talks to a scoring service, not to the fleet."""
    not_the_fleet = {"megatron_vespo/rewards/http.py"}
    users = [str(p.relative_to(REPO)) for p in (REPO / "megatron_vespo").rglob("*.py")
             if forbidden in p.read_text() and str(p.relative_to(REPO)) not in not_the_fleet]
    assert users == []


def test_the_fleet_side_satisfies_the_contracts(tmp_path):
    from rollout_sglang.client import SGLangClient
    from rollout_sglang.config import FleetConfig, ServerConfig, WeightSyncConfig
    from rollout_sglang.contracts import GenerationTarget, RolloutFleet, WeightSync
    from rollout_sglang.fleet import Fleet
    from rollout_sglang.weight_sync import DiskWeightSync, DistributedWeightSync
    from rollout_sglang.weight_sync.ipc import IPCWeightSync
    from rollout_sglang.worker_pool import WorkerPool, generation_target

    assert issubclass(SGLangClient, GenerationTarget) and issubclass(WorkerPool, GenerationTarget)
    assert all(issubclass(t, WeightSync) for t in (DiskWeightSync, DistributedWeightSync, IPCWeightSync))
    fleet = Fleet(FleetConfig(servers=[ServerConfig(model_path=str(tmp_path))], log_dir=str(tmp_path)))  # not started
    assert isinstance(fleet, RolloutFleet)
    assert isinstance(DiskWeightSync(fleet, WeightSyncConfig(transport="disk", disk_dir=str(tmp_path))), WeightSync)
    target = generation_target("http://127.0.0.1:1", return_routed_experts=True, request_timeout_s=1.0)
    assert isinstance(target, WorkerPool)
    assert isinstance(generation_target("http://127.0.0.1:1", return_routed_experts=False, request_timeout_s=1.0),
                      SGLangClient)
