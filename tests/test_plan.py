"""make_plan on a small synthetic catalog: placements, RTT, TP, spot, baselines, reasons."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skybroker import plan as planmod
from skybroker import plan_mix, plan_perf, plan_problem
from skybroker.catalog.schema import GPU, Catalog, Egress, Offering, Region
from skybroker.cli import app
from skybroker.perf.roofline import Hardware
from skybroker.plan import InfeasibleError, make_plan
from skybroker.spec import load_spec

PLAN_SIM_REQUESTS = plan_perf.SIM_REQUESTS  # what a plan searches on, before _fast shrinks it


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path))
    monkeypatch.setenv("SKYBROKER_PERF_CACHE", "0")
    monkeypatch.setenv("SKYBROKER_PERF_WORKERS", "1")  # small searches: no process pool
    monkeypatch.setattr(plan_perf, "SIM_REQUESTS", 40)
    monkeypatch.setattr(plan_mix, "TAIL_REQUESTS", 200)


def _catalog() -> Catalog:
    gpus = {
        "H100": GPU("H100", 80, 3350, 989, 1979, "nvlink", 900),
        "L4": GPU("L4", 24, 300, 121, 242, "pcie", 64),
        "A100-80GB": GPU("A100-80GB", 80, 2039, 312, None, "nvlink", 600),
    }
    regions = {
        ("aws", "us-east-1"): Region("aws", "us-east-1", "Ashburn", "US", 39.04, -77.49, "us"),
        ("aws", "eu-west-1"): Region("aws", "eu-west-1", "Dublin", "IE", 53.35, -6.26, "eu"),
        ("gcp", "us-east4"): Region("gcp", "us-east4", "Ashburn", "US", 39.04, -77.49, "us"),
        ("gcp", "europe-west4"): Region(
            "gcp", "europe-west4", "Eemshaven", "NL", 53.44, 6.83, "eu"
        ),
        ("aws", "ap-southeast-2"): Region(
            "aws", "ap-southeast-2", "Sydney", "AU", -33.87, 151.21, "oceania"
        ),
    }
    offs = []
    for cloud, region, f in [("aws", "us-east-1", 1.0), ("aws", "eu-west-1", 1.1), ("gcp", "us-east4", 1.05),
                             ("gcp", "europe-west4", 1.15), ("aws", "ap-southeast-2", 1.3)]:  # fmt: skip
        for gpu, n, price, spot in [("H100", 1, 4.0, 2.0), ("H100", 8, 32.0, 14.0), ("L4", 1, 0.8, 0.3),
                                    ("A100-80GB", 1, 2.5, 1.2), ("A100-80GB", 4, 10.0, 5.0)]:  # fmt: skip
            offs.append(Offering(cloud, region, f"{gpu.lower()}-{n}x", gpu, n, gpus[gpu].memory_gib,
                                 8 * n, 64 * n, round(price * f, 3), round(spot * f, 3)))  # fmt: skip
        # a dearer instance with the same GPUs (more vCPUs): dominated
        offs.append(
            Offering(cloud, region, "h100-1x-big", "H100", 1, 80, 32, 256, round(5.0 * f, 3), None)
        )
    egress = {c: Egress(c, 0.09, 0.02, 0.02) for c in ("aws", "gcp")}
    return Catalog(offs, gpus, regions, egress, ["synthetic"])


SPEC = """
name: t
infra: skypilot
model: meta-llama/Llama-3.1-8B-Instruct
workload:
  rate: 12
  input_tokens: {mean: 300, p99: 900}
  output_tokens: {mean: 150, p99: 400}
  users: {us-east: 0.5, eu-west: 0.5}
slo: {ttft_ms: 2000, tpot_ms: 80, percentile: 90, max_rtt_ms: 40}
engine: {max_model_len: 4096, max_num_seqs: 32, max_num_batched_tokens: 2048}
"""


def test_us_eu_plan_serves_each_area_nearby() -> None:
    plan = make_plan(load_spec(SPEC), _catalog())
    assert (
        plan.solver.status == "optimal" and plan.solver.gap is not None and plan.solver.gap <= 1e-3
    )
    assert plan.solver.num_components == 2
    served: dict[str, float] = {}
    for p in plan.placements:
        assert not p.spot  # spot defaults to never
        area = "us" if p.offering.region.startswith("us") else "eu"
        for user, rate in p.serves.items():
            assert user.startswith(area)  # 40 ms keeps US users in the US, EU users in Europe
            served[user] = served.get(user, 0) + rate
        assert p.offering.instance_type != "h100-1x-big"  # dominated
        assert p.perf_source == "roofline" and p.capacity_rps > 0
    assert served == pytest.approx({"us-east": 6.0, "eu-west": 6.0}, rel=1e-4)
    total = sum(p.cost_per_hour for p in plan.placements) + plan.egress_per_hour
    assert plan.cost_per_hour == pytest.approx(total)
    single = plan.baselines["cheapest_single_gpu"]
    assert single is not None and plan.cost_per_hour <= single + 1e-6
    assert plan.baselines["skypilot"] is not None
    json.dumps(plan.to_dict())  # JSON-able


def test_70b_needs_tensor_parallel() -> None:
    spec = load_spec(
        SPEC.replace("Llama-3.1-8B-Instruct", "Llama-3.3-70B-Instruct").replace(
            "tpot_ms: 80", "tpot_ms: 150"
        )
    )
    plan = make_plan(spec, _catalog())
    for p in plan.placements:
        assert p.tensor_parallel >= 2 and p.offering.gpu_count >= 2
        assert p.offering.gpu_count == p.tensor_parallel * p.data_parallel


def test_spot_and_blocklist() -> None:
    spec = load_spec(SPEC.replace("engine:", "constraints: {spot: prefer}\nengine:"))
    plan = make_plan(spec, _catalog())
    assert all(p.spot for p in plan.placements)
    first = plan.placements[0].key
    again = make_plan(spec, _catalog(), blocklist=frozenset({first}))
    assert first not in {p.key for p in again.placements}
    assert again.cost_per_hour >= plan.cost_per_hour - 1e-9
    half = make_plan(
        load_spec(
            SPEC.replace("engine:", "constraints: {spot: allowed, max_spot_share: 0.5}\nengine:")
        ),
        _catalog(),
    )
    spot_rate = sum(sum(p.serves.values()) for p in half.placements if p.spot)
    assert spot_rate <= 0.5 * 12 + 1e-6


def test_spot_spread_caps_each_locations_spot_traffic() -> None:
    """spot.spread 3: no location serves more than a third of the spot traffic."""
    spot = "constraints: {spot: prefer}\n"
    one = make_plan(load_spec(SPEC.replace("engine:", spot + "engine:")), _catalog())
    spec = load_spec(SPEC.replace("engine:", spot + "spot: {spread: 3}\nengine:"))
    plan = make_plan(spec, _catalog())
    at: dict[str, float] = {}
    for p in plan.placements:
        if p.spot:
            loc = f"{p.offering.cloud}/{p.offering.region}"
            at[loc] = at.get(loc, 0.0) + sum(p.serves.values())
    assert len(at) >= 3 and max(at.values()) <= sum(at.values()) / 3 + 1e-6
    assert len({f"{p.offering.cloud}/{p.offering.region}" for p in one.placements}) == 2
    assert plan.cost_per_hour >= one.cost_per_hour - 1e-9


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (("engine:", "constraints: {budget_per_hour: 1}\nengine:"), "budget $1/h is below the cheapest feasible $"),
        (("us-east: 0.5, eu-west: 0.5", "sa-east: 0.5, eu-west: 0.5"), "no offering within 40 ms of sa-east"),
        (("Llama-3.1-8B-Instruct", "Llama-3.3-70B-Instruct\nconstraints: {gpus: [L4]}"), "no allowed offering fits"),
        (("engine:", "constraints: {clouds: [azure]}\nengine:"), "no offering in the catalog matches"),
        (("tpot_ms: 80", "tpot_ms: 1"), "no allowed GPU meets the SLO"),
        (("engine:", "constraints: {max_region_share: 0.2}\nengine:"), "max_region_share 0.2 needs at least 5 regions"),
    ],
)  # fmt: skip
def test_infeasible_reasons(edit: tuple[str, str], reason: str) -> None:
    with pytest.raises(InfeasibleError) as err:
        make_plan(load_spec(SPEC.replace(*edit)), _catalog())
    assert reason in str(err.value)


def test_region_share_reason_counts_regions_within_rtt() -> None:
    spec = SPEC.replace("us-east: 0.5, eu-west: 0.5", "us-east: 1")
    spec = spec.replace("engine:", "constraints: {max_region_share: 0.2}\nengine:")
    with pytest.raises(InfeasibleError) as err:
        make_plan(load_spec(spec), _catalog())
    # the catalog has 5 regions; within 40 ms of us-east only the two in Ashburn
    assert "2 region(s) within 40 ms RTT of the users" in str(err.value)
    assert "aws/us-east-1, gcp/us-east4" in str(err.value)


def test_budget_covers_egress() -> None:
    free = make_plan(load_spec(SPEC), _catalog(), baselines=False)
    assert free.egress_per_hour > 0
    instances = free.cost_per_hour - free.egress_per_hour
    budget = round(instances + free.egress_per_hour / 2, 2)  # above instances, below the total
    spec = SPEC.replace("engine:", f"constraints: {{budget_per_hour: {budget}}}\nengine:")
    try:
        plan = make_plan(load_spec(spec), _catalog(), baselines=False)
    except InfeasibleError as e:
        assert "egress" in str(e)
    else:
        assert plan.cost_per_hour <= budget + 1e-6


def test_local_infra_plans_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    # a fixed machine (the measured one depends on the load of the test host)
    cpu = Hardware("cpu", "test-cpu", 2, 16.0, 10.0, 0.1)
    monkeypatch.setattr(plan_perf, "cpu_hardware", lambda: cpu)
    monkeypatch.setattr(plan_problem, "cpu_hardware", lambda: cpu)
    spec = load_spec(Path(__file__).parent.parent / "examples" / "smollm2-local.yaml")
    plan = make_plan(spec)
    (p,) = plan.placements
    assert p.key == ("local", "local", "localhost", False)
    assert p.offering.gpu == "cpu" and plan.cost_per_hour == 0 and p.replicas == 1
    out = CliRunner().invoke(app, ["plan", "examples/smollm2-local.yaml", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["placements"][0]["instance_type"] == "localhost"
    too_much = load_spec(
        Path("examples/smollm2-local.yaml").read_text().replace("rate: 0.03 ", "rate: 500 ")
    )
    with pytest.raises(InfeasibleError, match="this machine sustains about") as err:
        make_plan(too_much)
    # the rate it names is the mix's (harmonic over the request classes, as the ILP's capacity
    # row): plannable 2% below it, not 2% above
    cap = float(re.search(r"sustains about ([0-9.]+) req/s", str(err.value)).group(1))
    text = Path("examples/smollm2-local.yaml").read_text()
    at = lambda rate: load_spec(text.replace("rate: 0.03 ", f"rate: {rate:.4f} "))  # noqa: E731
    assert make_plan(at(cap * 0.98)).placements[0].replicas == 2  # the 2 cores' 2 replicas
    with pytest.raises(InfeasibleError):
        make_plan(at(cap * 1.02))


def test_local_example_plans_on_the_machine_its_profile_was_measured_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the 2-core AMD EPYC of catalogs/profiles/smollm2-135m-cpu.json the measured profile
    is used, and the example's SLO holds each request class (the 400-token prompts too) at
    its rate: `make demo` plans there."""
    cpu = Hardware("cpu", "AMD EPYC", 2, 23.5, 23.0, 0.088)
    monkeypatch.setattr(plan_perf, "SIM_REQUESTS", PLAN_SIM_REQUESTS)  # the long prompts' tail
    monkeypatch.setattr(plan_perf, "cpu_hardware", lambda: cpu)
    monkeypatch.setattr(plan_problem, "cpu_hardware", lambda: cpu)
    plan = make_plan(load_spec(Path(__file__).parent.parent / "examples" / "smollm2-local.yaml"))
    (p,) = plan.placements
    assert p.key == ("local", "local", "localhost", False) and p.replicas == 1
    assert p.perf_source.startswith("profile"), p.perf_source


def test_local_machine_holds_replicas_by_cores_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """min_replicas: 2 on infra local is two engine processes of one core each; memory or the
    spec can hold the machine to fewer."""

    def machine(hw: Hardware) -> None:
        for mod in (plan_perf, plan_problem):
            monkeypatch.setattr(mod, "cpu_hardware", lambda: hw)

    machine(Hardware("cpu", "test-cpu", 2, 16.0, 10.0, 0.1))
    text = Path("examples/smollm2-local.yaml").read_text()
    two = load_spec(text.replace("infra: local", "infra: local\nconstraints: {min_replicas: 2}"))
    (p,) = make_plan(two).placements
    assert p.replicas == 2 and p.offering.vcpus == 1
    one = two.model_copy(deep=True)
    one.constraints.max_local_replicas = 1
    with pytest.raises(InfeasibleError, match="min_replicas 2"):
        make_plan(one)
    assert planmod.local_replicas(one, planmod.resolve_arch(one.model, "local")) == 1
    # 2.5 GiB of memory holds one replica of this model with 1 GiB of KV cache, not two.
    machine(Hardware("cpu", "c", 8, 2.5, 10.0, 0.1))
    assert planmod.local_replicas(two, planmod.resolve_arch(two.model, "local")) == 1
    machine(Hardware("cpu", "c", 8, 64.0, 10.0, 0.1))
    assert planmod.local_replicas(two, planmod.resolve_arch(two.model, "local")) == 8


def test_measured_profile_overrides_roofline(tmp_path: Path) -> None:
    from skybroker.models import lookup
    from skybroker.perf import profile as prof

    arch = lookup("llama-3.1-8b")
    assert arch is not None
    pts = [{"num_prefill_tokens": p, "num_decode_seqs": d, "total_context_tokens": c,
            "seconds": 0.002 + 3e-5 * p + 2e-4 * d + 1e-8 * c}
           for p, d, c in [(512, 0, 512), (0, 8, 4000), (0, 32, 20000), (256, 16, 9000), (1024, 4, 6000)]]  # fmt: skip
    path = tmp_path / "h100.json"
    prof.save(prof.validate({"schema": prof.SCHEMA, "hardware": {"kind": "gpu", "name": "H100", "count": 1},
                             "model": {"name": "Llama-3.1-8B", "arch_hash": arch.arch_hash},
                             "points": pts}), path)  # fmt: skip
    spec = load_spec(
        SPEC.replace("engine: {", f"constraints: {{gpus: [H100]}}\nengine: {{profiles: [{path}], ")
    )
    plan = make_plan(spec, _catalog())
    assert plan.placements and all(p.perf_source == f"profile:{path}" for p in plan.placements)


def test_capacities_searched_only_where_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_plan searches the capacities of the GPU kinds the optimum and the baselines need
    (the others are ruled out on closed-form upper bounds); the plan is the one planned with
    every capacity searched."""
    from skybroker.perf import capacity

    spec = load_spec(SPEC.replace("engine:", "constraints: {spot: allowed}\nengine:"))
    monkeypatch.setattr(capacity, "_memo", {})
    lazy = make_plan(spec, _catalog())
    everything = plan_perf.perf_per_config
    monkeypatch.setattr(planmod, "perf_per_config",
                        lambda *a, exact=True: everything(*a, exact=True))  # fmt: skip
    monkeypatch.setattr(capacity, "_memo", {})
    full = make_plan(spec, _catalog())
    assert full.solver.searched == ["A100-80GB", "H100", "L4"]
    assert len(lazy.solver.searched) < len(full.solver.searched)
    assert lazy.cost_per_hour == pytest.approx(full.cost_per_hour, rel=1e-9)
    assert lazy.baselines == pytest.approx(full.baselines, rel=1e-9)
    assert {p.key: p.replicas for p in lazy.placements} == {
        p.key: p.replicas for p in full.placements
    }


def test_tensor_parallel_is_chosen_per_gpu_kind() -> None:
    """TP 1 on an A100 misses an 11 ms TPOT (weights read in ~10 ms + step overhead); the
    optimizer tries TP 2 and 4 on the 4-GPU instance instead of dropping the kind."""
    spec = SPEC.replace("tpot_ms: 80", "tpot_ms: 11, margin: 0")
    spec = spec.replace("engine:", "constraints: {gpus: [A100-80GB]}\nengine:")
    plan = make_plan(load_spec(spec), _catalog(), baselines=False)
    assert plan.placements
    for p in plan.placements:
        assert p.offering.gpu_count == 4 and p.tensor_parallel >= 2
        assert p.data_parallel == 4 // p.tensor_parallel
        assert "TP1 x4 misses the SLO" in p.config_note
        assert p.tpot_s <= 0.011
    d = plan.to_dict()["placements"][0]
    assert d["config_note"].startswith(f"TP{d['tensor_parallel']} x{d['data_parallel']}")


def test_margin_sizes_capacity_for_slower_hardware() -> None:
    costs = {}
    for m in (0, 0.2):
        plan = make_plan(load_spec(SPEC.replace("percentile: 90", f"percentile: 90, margin: {m}")),
                         _catalog(), baselines=False)  # fmt: skip
        costs[m] = plan.cost_per_hour
        for p in plan.placements:
            assert p.margin == m
            # at its load the placement still meets the SLO with steps (1 + m) x slower
            assert p.headroom is not None and p.headroom >= m - 0.03
    assert costs[0.2] >= costs[0]
    auto = make_plan(load_spec(SPEC), _catalog(), baselines=False)
    assert {p.margin for p in auto.placements} == {0.25}  # the roofline's default


def test_skypilot_baseline_uses_spot_and_region_share() -> None:
    """SkyServe-style: the spot share of the traffic on the cheapest spot instance, the rest
    on-demand; no region above max_region_share."""
    spec = SPEC.replace("us-east: 0.5, eu-west: 0.5", "us-east: 1")
    spec = spec.replace("engine:", "constraints: {spot: allowed, max_spot_share: 0.5, "
                        "max_region_share: 0.5}\nengine:")  # fmt: skip
    plan = make_plan(load_spec(spec), _catalog())
    note = plan.baseline_notes["skypilot"]
    parts = note.split("; ")
    assert any(" spot in " in x for x in parts) and any(" spot in " not in x for x in parts)
    assert {x.rsplit(" in ", 1)[1] for x in parts} == {"aws/us-east-1", "gcp/us-east4"}
    assert plan.baselines["skypilot"] >= plan.cost_per_hour - 1e-9
    never = make_plan(load_spec(spec.replace("spot: allowed, max_spot_share: 0.5, ", "")),
                      _catalog())  # fmt: skip
    assert " spot in " not in never.baseline_notes["skypilot"]


def test_margin_setting_is_validated() -> None:
    from skybroker.spec import SpecError

    with pytest.raises(SpecError, match=r"slo\.margin"):
        load_spec(SPEC.replace("percentile: 90", "percentile: 90, margin: 5"))
    assert load_spec(SPEC).slo.margin == "auto"


_PLAN_JSON = """
import json, sys
from skybroker.plan import make_plan
from skybroker.spec import load_spec
d = make_plan(load_spec(sys.argv[1])).to_dict()
print(json.dumps({k: d[k] for k in ("cost_per_hour", "placements", "baselines", "mix_rounds")}))
"""


def _plan_in_process(path: Path, home: Path, hash_seed: str) -> dict:
    import os
    import subprocess
    import sys

    env = {**os.environ, "SKYBROKER_HOME": str(home), "PYTHONHASHSEED": hash_seed,
           "SKYBROKER_PERF_CACHE": "1", "SKYBROKER_SIM_REQUESTS": "80",
           "SKYBROKER_TAIL_REQUESTS": "200"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _PLAN_JSON, str(path)], env=env,
                         capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_same_spec_same_plan_in_separate_processes(tmp_path: Path) -> None:
    """An example planned in three processes (other hash seeds; a cold and a warm perf
    cache): the same cost, placements, loads, predictions and baselines, to the digit."""
    path = Path(__file__).resolve().parents[1] / "examples" / "chat-8b-us-eu.yaml"
    cold = _plan_in_process(path, tmp_path / "a", "1")
    assert cold == _plan_in_process(path, tmp_path / "b", "2")
    assert cold == _plan_in_process(path, tmp_path / "a", "3")  # warm: the cache a left


def test_a_warm_re_plan_keeps_what_runs_unless_switching_pays() -> None:
    from skybroker.plan_problem import Warm

    spec = load_spec(SPEC)
    cold = make_plan(spec, _catalog(), baselines=False)
    running = {(*p.key, p.tensor_parallel): p.replicas for p in cold.placements}
    same = make_plan(spec, _catalog(), baselines=False, warm=Warm(running))
    assert {(*p.key, p.tensor_parallel): p.replicas for p in same.placements} == running
    assert same.cost_per_hour == pytest.approx(cold.cost_per_hour)  # launches not in the $/h
    # one H100 per region runs (dearer than the cold plan): with a startup that costs an
    # hour of the price, keeping them is cheaper than switching; with none, it is not
    h100 = {
        ("aws", "us-east-1", "h100-1x", False, 1): 1,
        ("aws", "eu-west-1", "h100-1x", False, 1): 1,
    }
    kept = make_plan(spec, _catalog(), baselines=False, warm=Warm(h100, startup_s=3600))
    assert {(*p.key, p.tensor_parallel): p.replicas for p in kept.placements} == h100
    free = make_plan(spec, _catalog(), baselines=False, warm=Warm(h100, startup_s=0))
    assert free.cost_per_hour == pytest.approx(cold.cost_per_hour)
