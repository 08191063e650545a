"""The SQL store: deployments, replicas and events round-trip; SQLite runs in WAL mode."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from skybroker.state import (
    DeploymentStatus,
    ReplicaStatus,
    StateError,
    Store,
    default_url,
)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def _create(store: Store, name: str = "demo"):
    return store.create_deployment(
        name,
        "local",
        spec={"name": name, "model": "m"},
        plan={"cost_per_hour": 1.5},
        targets=[{"key": ["local", "local", "localhost", False], "replicas": 2}],
    )


def test_default_url_follows_skybroker_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path / 'home' / 'state.db'}"
    s = Store()
    assert (tmp_path / "home" / "state.db").exists()
    s.close()


def test_sqlite_is_in_wal_mode(store, tmp_path) -> None:
    _create(store)
    mode = sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_deployment_round_trip_and_update(store) -> None:
    dep = _create(store)
    assert dep.status == DeploymentStatus.PROVISIONING
    assert dep.endpoint is None
    store.update_deployment(
        "demo", router_port=9000, blocklist=[("aws", "us-east-1", "g5.xlarge", True)]
    )
    got = store.get_deployment("demo")
    assert got is not None
    assert got.spec == {"name": "demo", "model": "m"}
    assert got.targets[0]["replicas"] == 2
    assert got.blocklist == [("aws", "us-east-1", "g5.xlarge", True)]
    assert got.endpoint == "http://127.0.0.1:9000/v1"
    assert [d.name for d in store.list_deployments()] == ["demo"]
    with pytest.raises(StateError, match="unknown deployment field 'bogus'"):
        store.update_deployment("demo", bogus=1)


def test_duplicate_and_unknown_deployments_are_clear_errors(store) -> None:
    _create(store)
    with pytest.raises(StateError, match="already exists"):
        _create(store)
    with pytest.raises(StateError, match="unknown deployment 'nope'"):
        store.update_deployment("nope", status="READY")
    assert store.get_deployment("nope") is None
    assert store.delete_deployment("nope") is False


def test_replicas_names_status_filter_and_handle(store) -> None:
    _create(store)
    r1 = store.add_replica("demo", 0, ("local", "local", "localhost", False))
    r2 = store.add_replica("demo", 0, ("local", "local", "localhost", False))
    assert r1.name == f"demo-{r1.id}" and r1.name != r2.name
    store.update_replica(r1.name, status=ReplicaStatus.READY, handle={"pid": 12}, url="http://x")
    store.update_replica(r2.name, status=ReplicaStatus.TERMINATED)
    live = store.list_replicas("demo")
    assert [r.name for r in live] == [r1.name]
    assert live[0].handle == {"pid": 12}
    assert live[0].offering_key == ("local", "local", "localhost", False)
    assert len(store.list_replicas("demo", live_only=False)) == 2
    assert store.get_replica(r2.name).status == ReplicaStatus.TERMINATED


def test_events_order_limit_and_cascade_delete(store) -> None:
    _create(store)
    r = store.add_replica("demo", 0, ("local", "local", "localhost", False))
    for i in range(5):
        store.add_event("demo", "probe", f"event {i}", replica=r.name, data={"i": i})
    events = store.list_events("demo", limit=3)
    assert [e.message for e in events] == ["event 2", "event 3", "event 4"]
    assert events[-1].data == {"i": 4}
    assert store.delete_deployment("demo") is True
    assert store.get_replica(r.name) is None
    assert store.list_deployments() == []
    _create(store)  # the name is free again
    assert store.list_events("demo") == []


def test_two_stores_on_one_file_see_each_other_and_threads_are_safe(store, tmp_path) -> None:
    _create(store)
    other = Store(f"sqlite:///{tmp_path / 'state.db'}")
    errors: list[Exception] = []

    def add(n: int) -> None:
        try:
            for i in range(10):
                other.add_event("demo", "t", f"{n}-{i}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list_events("demo")) == 40
    other.close()
