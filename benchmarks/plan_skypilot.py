"""SkyPilot's own optimizer beside the planner, in process and offline, on AWS.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/plan_skypilot.py

SkyPilot 0.14 (the `skypilot` extra) runs with its runtime dir in a temp dir: its AWS
catalog (`vms.csv`) is seeded from the bundled catalog's AWS rows, the accelerator list from
their GPU names, AWS marked enabled in its state DB (what `sky check` would write with
credentials), and every socket connect refused. For each bundled example restricted to AWS
(`constraints.clouds: [aws]`), SkyPilot's `Optimizer.optimize` is given a task whose
resources are any of the AWS accelerator sets the model fits on with TP = the instance's
GPU count (`use_spot` when the spec allows spot), and picks the cheapest. Printed beside
the planner's plan and its SkyPilot-style baseline: SkyPilot's pick and price, and how many
of it the SLO needs by the planner's capacity model (SkyPilot itself knows no SLO, and no
RTT: its pick may be far from the users).
"""

from __future__ import annotations

import csv
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SKYBROKER_HOME", tempfile.mkdtemp(prefix="skybroker-sky-"))
os.environ["SKYBROKER_PERF_WORKERS"] = "1"  # its process pool talks over a socket too


def seed_skypilot(root: Path) -> Any:
    """SkyPilot imported offline with the bundled AWS offerings as its catalog."""
    os.environ["SKY_RUNTIME_DIR"] = str(root)
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(root / "no-aws-credentials")
    os.environ["AWS_CONFIG_FILE"] = str(root / "no-aws-config")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    aws = root / ".sky/catalogs/v8/aws"
    aws.mkdir(parents=True)
    head = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone"
    rows, gpus = [head], set()
    for r in csv.DictReader((ROOT / "catalogs/offerings.csv").open()):
        if r["cloud"] == "aws":
            rows.append(f"{r['instance_type']},{r['gpu']},{r['gpu_count']},{r['vcpus']},"
                        f"{r['memory_gib']},,{r['price']},{r['spot_price']},{r['region']},"
                        f"{r['region']}a")  # fmt: skip
            gpus.add(r["gpu"])
    (aws / "vms.csv").write_text("\n".join(rows) + "\n")
    (aws / "images.csv").write_text("Tag,Region,OS,OSVersion,ImageId,CreationDate\n")
    (aws / "instance_quota_mapping.csv").write_text("InstanceType,Quota\n")
    common = root / ".sky/catalogs/v8/common"
    common.mkdir(parents=True)
    (common / "accelerators.csv").write_text(
        "AcceleratorName,Clouds\n" + "".join(f"{g},\"['AWS']\"\n" for g in sorted(gpus))
    )
    (common / "metadata.csv").write_text("GPU,MemoryGB,Manufacturer\n")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("offline")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    import sky
    from sky import check, clouds, global_user_state, skypilot_config
    from sky.catalog import common as catalog_common

    catalog_common._ABSOLUTE_VERSIONED_CATALOG_DIR = str(root / ".sky/catalogs/v8")
    ws = skypilot_config.get_active_workspace()
    global_user_state.set_allowed_clouds(check._get_workspace_allowed_clouds(ws), ws)
    global_user_state.set_enabled_clouds(["AWS"], clouds.CloudCapability.COMPUTE, ws)
    return sky


def skypilot_pick(sky: Any, accelerators: list[tuple[str, int]], spot: bool) -> Any:
    from sky import optimizer

    with sky.Dag() as dag:
        task = sky.Task(run="true")
        task.set_resources({sky.Resources(cloud=sky.AWS(), accelerators={g: n}, use_spot=spot)
                            for g, n in accelerators})  # fmt: skip
    dag = optimizer.Optimizer.optimize(dag, quiet=True)
    return dag.tasks[0].best_resources


def main() -> None:
    sky = seed_skypilot(Path(tempfile.mkdtemp(prefix="skyruntime-")))
    from skybroker.catalog import load_catalog
    from skybroker.perf.workload import request_classes, workload_samples
    from skybroker.plan import InfeasibleError, make_plan
    from skybroker.plan_mix import linear_capacity
    from skybroker.plan_perf import gpu_configs, replica_perfs, required_len, resolve_arch
    from skybroker.spec import parse_spec

    cat = load_catalog()
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("infra") != "skypilot":
            continue
        data.setdefault("constraints", {})["clouds"] = ["aws"]
        spec = parse_spec(data, str(path))
        try:
            plan = make_plan(spec, cat)
        except InfeasibleError as e:
            print(f"{path.stem} (AWS only): infeasible: {e}")
            continue
        arch = resolve_arch(spec.model, spec.infra)
        classes = request_classes(*workload_samples(spec.workload))
        need = required_len(spec, arch, classes)
        sets = sorted({(o.gpu, o.gpu_count) for o in cat.offerings if o.cloud == "aws"
                       and any(hw.count == o.gpu_count
                               for hw, _ in gpu_configs(arch, spec, cat, o.gpu, o.gpu_count, need))})  # fmt: skip
        spot = spec.constraints.spot != "never"
        best = skypilot_pick(sky, sets, spot)
        gpu, n = next(iter(best.accelerators.items()))
        price = best.get_cost(3600)
        # how many the SLO needs, by the planner's capacity of that instance (TP = its GPUs)
        hw, kv = next((h, k) for h, k in gpu_configs(arch, spec, cat, gpu, n, need) if h.count == n)
        rp = replica_perfs([(arch, hw, kv, None)], spec, classes)[0]
        cap = linear_capacity(rp, {b: c.share for b, c in enumerate(classes)})
        placed = "; ".join(f"{p.replicas} x {p.offering.instance_type} {p.offering.region}"
                           for p in plan.placements)  # fmt: skip
        print(
            f"{path.stem} (AWS only): planner ${plan.cost_per_hour:.2f}/h ({placed}); "
            f"skypilot-style baseline ${plan.baselines.get('skypilot') or math.nan:.2f}/h"
        )
        if cap > 0:
            count = max(math.ceil(spec.workload.rate / cap - 1e-9), spec.constraints.min_replicas)
            fleet = f"{count} of them ({cap:.2f} req/s each) cost ${count * price:.2f}/h"
        else:
            fleet = "it misses the SLO for some request class (no fleet of it meets the spec)"
        print(f"    SkyPilot's optimizer picks {best.instance_type} ({n} x {gpu}"
              f"{', spot' if best.use_spot else ''}) in {best.region} at ${price:.3f}/h; "
              f"by the planner's capacity model {fleet}; it ignores RTT", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
