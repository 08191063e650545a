"""TLS and keys between the broker and its replicas, against the real engine server over HTTPS.

A real `python -m engine.serve` (tiny random Llama) serves HTTPS with a certificate from
`skybroker.tls.self_signed` and a key of its replica row (`keys.replica_api_key`); the router
(a real uvicorn server) and the controller's probe reach it pinned to that certificate, and
refuse it when they expect another. The slow test runs the whole path: controller, local
replicas with `LocalProvisioner(tls=True)`, router process. The SkyPilot task is built with
SkyPilot's real Task, and its TLS shell runs in bash.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import openai
import pytest

from engine.serve import main
from skybroker.controller import Controller, ProbeConfig
from skybroker.keys import replica_api_key
from skybroker.provision.local import LocalProvisioner, free_port
from skybroker.provision.skypilot import (
    REMOTE_TLS,
    TLS_SECRETS,
    SkyPilotProvisioner,
    tls_files_command,
)
from skybroker.replica_auth import replica_auth, replica_client
from skybroker.router import ReplicaTarget, Router, RouterServer
from skybroker.state import Replica, ReplicaStatus, Store
from skybroker.tls import CertPair, fingerprint, pinned_context, self_signed
from tests.engine_process import start_engine, wait_healthy
from tests.skypilot_env import replica_spec
from tests.test_provision_skypilot import sky  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(300)
MODEL = "tiny"
CREATED = 1765000000.25  # the replica row's creation time: part of its key


@dataclass
class TLSEngine:
    url: str
    pair: CertPair
    rep: Replica  # the replica row the engine is, its certificate in the handle
    proc: subprocess.Popen[str]


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _replica(name: str, url: str, cert: str | None) -> Replica:
    info = {"tls_cert": cert} if cert else {}
    return Replica(
        id=1, deployment="tls", name=name, target=0, cloud="local", region="local",
        instance_type="localhost", spot=False, status=ReplicaStatus.READY, url=url,
        handle={"provider": "local", "name": name, "url": url, "info": info}, failures=0,
        message="", created_at=CREATED, updated_at=CREATED, launched_at=CREATED,
        ready_at=CREATED,
    )  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSEngine]:
    tmp = tmp_path_factory.mktemp("tls")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKYBROKER_HOME", str(tmp / "home"))
        pair = self_signed("tls-1")
        port = free_port()
        url = f"https://127.0.0.1:{port}"
        rep = _replica("tls-1", url, pair.cert_pem)
        key = _write(tmp / "api-key", replica_api_key(rep.name, rep.created_at))
        log = tmp / "engine.log"
        with log.open("w") as out:
            proc = start_engine(
                "--model", str(tiny_llama_dir), "--port", str(port), "--max-model-len", "256",
                "--kv-cache-gib", "0.05", "--served-model-name", MODEL, "--api-key-file", str(key),
                "--ssl-certfile", str(_write(tmp / "cert.pem", pair.cert_pem, 0o644)),
                "--ssl-keyfile", str(_write(tmp / "key.pem", pair.key_pem)), stdout=out,
            )  # fmt: skip
        srv = TLSEngine(url, pair, rep, proc)
        try:
            wait_healthy(proc, url, 240, verify=pinned_context(pair.cert_pem), log=log)
            yield srv
        finally:
            proc.terminate()
            proc.wait(60)


def test_the_engine_serves_https_to_its_pinned_certificate_only(engine: TLSEngine) -> None:
    auth = replica_auth(engine.rep)
    assert auth.pin == engine.pair.sha256 == fingerprint(engine.pair.cert_pem)
    r = httpx.get(engine.url + "/v1/models", headers=auth.headers, verify=auth.verify())
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    impostor = self_signed("tls-1")  # same name, another key: not the pinned certificate
    for verify in (pinned_context(impostor.cert_pem), True):  # True: the system's CAs
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(engine.url + "/health", verify=verify)
    with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer from the TLS port
        httpx.get(engine.url.replace("https://", "http://") + "/health", timeout=5)


def test_metrics_want_the_replica_key(engine: TLSEngine) -> None:
    verify = pinned_context(engine.pair.cert_pem)
    assert httpx.get(engine.url + "/metrics", verify=verify).status_code == 401
    with replica_client(engine.rep) as client:
        r = client.get("/metrics")
        assert r.status_code == 200 and "engine:requests_total" in r.text
    other = replace(engine.rep, created_at=CREATED + 1)  # a later replica of the same name
    with replica_client(other) as client:
        assert client.get("/metrics").status_code == 401


def test_the_probe_pins_the_certificate(engine: TLSEngine, tmp_path: Path) -> None:
    c = Controller(Store(f"sqlite:///{tmp_path / 's.db'}"), {}, adopt=False, serve_routers=False)
    try:
        assert c._healthy(engine.rep)
        wrong = _replica(engine.rep.name, engine.url, self_signed("x").cert_pem)
        assert not c._healthy(wrong)
        assert not c._healthy(_replica(engine.rep.name, engine.url, None))  # http to https
    finally:
        c.close()


def test_the_router_sends_over_tls_and_refuses_a_wrong_certificate(engine: TLSEngine) -> None:
    auth = replica_auth(engine.rep)
    router = Router("tls", api_key="client-key")
    srv = RouterServer(router, port=0)
    srv.start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="client-key", max_retries=0)
        now = time.time()
        wrong = ReplicaTarget("tls-1", engine.url, 1.0, True, now, api_key=auth.api_key,
                              tls_cert=self_signed("tls-1").cert_pem)  # fmt: skip
        router.set_replicas([wrong])
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt="the cat", max_tokens=4)
        assert e.value.status_code == 503 and router.snapshot()[0]["ready"] is False
        good = replace(wrong, tls_cert=auth.tls_cert, probed_at=time.time())
        router.set_replicas([good])
        out = client.completions.create(model=MODEL, prompt="the cat", max_tokens=4)
        assert out.usage.completion_tokens == 4
        assert list(router._pinned) == [auth.pin]  # the impostor's pool is closed
        stream = client.completions.create(model=MODEL, prompt="the", max_tokens=3, stream=True)
        assert len([c for c in stream if c.choices and c.choices[0].text]) >= 1
        stale = replace(good, api_key=replica_api_key("tls-1", CREATED - 1))  # a past replica's
        router.set_replicas([stale])
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model=MODEL, prompt="the cat", max_tokens=4)
    finally:
        srv.stop()


def test_tls_flags_are_checked_before_the_port_opens(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = self_signed("a"), self_signed("b")
    cert = _write(tmp_path / "a.pem", a.cert_pem)
    key_b = _write(tmp_path / "b.key", b.key_pem)
    base = ["--model", str(tiny_llama_dir), "--port", str(free_port())]
    cases = [
        (["--ssl-certfile", str(cert)], "--ssl-certfile needs --ssl-keyfile"),
        (["--ssl-keyfile", str(key_b)], "--ssl-keyfile needs --ssl-certfile"),
        (["--ssl-certfile", str(cert), "--ssl-keyfile", str(key_b)], "are not a PEM certificate"),
        (["--ssl-certfile", str(tmp_path / "none"), "--ssl-keyfile", str(key_b)], "cannot read"),
    ]
    for flags, message in cases:
        assert main(base + flags) == 2
        assert message in capsys.readouterr().err


def test_skypilot_ships_the_key_as_a_secret_and_serves_https(sky, tmp_path: Path) -> None:  # noqa: F811
    pair = self_signed("sb-demo-12")
    prov = SkyPilotProvisioner(workdir=False, wheel=_write(tmp_path / "w.whl", "PK"))
    config = prov.build_task(replica_spec(), pair).to_yaml_config()
    cert_b64, key_b64 = (config["secrets"][n] for n in TLS_SECRETS)
    assert base64.b64decode(key_b64).decode() == pair.key_pem
    assert base64.b64decode(cert_b64).decode() == pair.cert_pem
    assert key_b64 not in str(config.get("envs")) and key_b64 not in config["run"]
    assert config["run"].startswith(tls_files_command() + "\n")
    assert f"--ssl-certfile {REMOTE_TLS[0]} --ssl-keyfile {REMOTE_TLS[1]}" in config["run"]
    plain = SkyPilotProvisioner(workdir=False, wheel=tmp_path / "w.whl", tls=False)
    assert "--ssl" not in plain.build_task(replica_spec()).to_yaml_config()["run"]
    # The replica's shell writes the files from the secrets, the key readable by its owner only.
    env = {**os.environ, TLS_SECRETS[0]: cert_b64, TLS_SECRETS[1]: key_b64}
    subprocess.run(["bash", "-c", tls_files_command()], cwd=tmp_path, env=env, check=True)
    cert_file, key_file = (tmp_path / p for p in REMOTE_TLS)
    assert cert_file.read_text() == pair.cert_pem and key_file.read_text() == pair.key_pem
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


@pytest.mark.slow
def test_local_replicas_over_tls_end_to_end(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Controller, a real engine replica serving HTTPS, its router process: the probe and the
    router pin the replica's certificate; one that no longer matches takes it out of service."""
    from skybroker.plan import make_plan
    from skybroker.spec import parse_spec
    from tests.test_launch_e2e import ENGINE, Loop

    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    spec = parse_spec(
        {
            "name": "tls",
            "infra": "local",
            "model": {"path": str(tiny_llama_dir), "name": MODEL},
            "workload": {"rate": 0.05, "input_tokens": {"mean": 16}, "output_tokens": {"mean": 8}},
            "slo": {"ttft_ms": 30000, "tpot_ms": 5000, "percentile": 90},
            "engine": ENGINE,
        }
    )
    probe = ProbeConfig(timeout_s=5, failure_threshold=1, unhealthy_timeout_s=600)
    c = Controller(store, {"local": LocalProvisioner(tls=True)}, probe=probe)
    loop = Loop(c)
    try:
        dep = c.create(spec, make_plan(spec, baselines=False))
        deadline = time.monotonic() + 240
        while c.get("tls").status != "READY":
            assert time.monotonic() < deadline, c.describe("tls")
            time.sleep(0.2)
        (rep,) = c.replicas("tls")
        assert rep.url.startswith("https://127.0.0.1:")
        pin = fingerprint(rep.handle["info"]["tls_cert"])
        assert c.describe("tls")["replicas"][0]["tls_sha256"] == pin  # what status shows
        key_file = tmp_path / "home" / "replicas" / rep.name / "tls.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.read_text() not in Path(tmp_path / "state.db").read_text(errors="replace")
        client = openai.OpenAI(base_url=dep.endpoint, api_key=c.api_key("tls"), max_retries=0)
        out = client.completions.create(model=MODEL, prompt="the", max_tokens=3)
        assert out.usage.completion_tokens == 3
        with replica_client(rep) as rc:
            assert rc.get("/metrics").status_code == 200
        # The row now pins another certificate: the probe refuses the replica's.
        handle = dict(rep.handle)
        handle["info"] = {**handle["info"], "tls_cert": self_signed(rep.name).cert_pem}
        store.update_replica(rep.name, handle=handle)
        deadline = time.monotonic() + 60
        while c.replicas("tls")[0].status != ReplicaStatus.NOT_READY:
            assert time.monotonic() < deadline, c.describe("tls")
            time.sleep(0.2)
    finally:
        loop.close()
        c.delete("tls")
        c.close()
