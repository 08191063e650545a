"""The broker's state: deployments, their replicas and events, in a SQL store (SQLAlchemy 2).

SQLite in WAL mode at `$SKYBROKER_HOME/state.db` (default `~/.skybroker/state.db`) unless a
SQLAlchemy URL is given, so several broker servers can share one database. The store returns
plain dataclasses, never ORM objects, so callers need no session. Secrets (API keys, hub
tokens) are never written here: replica environments are passed to provisioners only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


class DeploymentStatus(StrEnum):
    PROVISIONING = "PROVISIONING"  # replicas still launching or not yet ready
    READY = "READY"  # every desired replica is ready
    DEGRADED = "DEGRADED"  # some replicas ready, some being replaced
    FAILED = "FAILED"  # the broker gave up (no feasible plan, repeated launch errors)
    DELETING = "DELETING"  # `down` in progress


class ReplicaStatus(StrEnum):
    PENDING = "PENDING"  # desired, not launched yet
    PROVISIONING = "PROVISIONING"  # provisioner.launch in flight
    STARTING = "STARTING"  # running, engine not answering /health yet
    READY = "READY"  # /health answered 200: the router may use it
    NOT_READY = "NOT_READY"  # was ready, probes failing
    DRAINING = "DRAINING"  # leaving: the router sends it nothing new, in-flight ones finish
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"  # gone (replaced, scaled down, or torn down)
    FAILED = "FAILED"  # launch failed; nothing of it runs


LIVE_REPLICA_STATUSES = (
    ReplicaStatus.PENDING,
    ReplicaStatus.PROVISIONING,
    ReplicaStatus.STARTING,
    ReplicaStatus.READY,
    ReplicaStatus.NOT_READY,
    ReplicaStatus.DRAINING,
    ReplicaStatus.TERMINATING,
)


class StateError(Exception):
    """A store operation that cannot be done (unknown or duplicate deployment)."""


class _Base(DeclarativeBase):
    pass


class _DeploymentRow(_Base):
    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    infra: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    spec_json: Mapped[str] = mapped_column(Text)
    plan_json: Mapped[str] = mapped_column(Text)
    targets_json: Mapped[str] = mapped_column(Text, default="[]")
    blocklist_json: Mapped[str] = mapped_column(Text, default="[]")
    router_host: Mapped[str] = mapped_column(String(255), default="127.0.0.1")
    router_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    replicas: Mapped[list[_ReplicaRow]] = relationship(
        back_populates="deployment", cascade="all, delete-orphan"
    )
    events: Mapped[list[_EventRow]] = relationship(cascade="all, delete-orphan")


class _ReplicaRow(_Base):
    __tablename__ = "replicas"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), index=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    target: Mapped[int] = mapped_column(Integer)  # index into the deployment's targets
    cloud: Mapped[str] = mapped_column(String(64))
    region: Mapped[str] = mapped_column(String(64))
    instance_type: Mapped[str] = mapped_column(String(128))
    spot: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(32))
    url: Mapped[str | None] = mapped_column(String(512), nullable=True)
    handle_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    launched_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ready_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    deployment: Mapped[_DeploymentRow] = relationship(back_populates="replicas")


class _EventRow(_Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), index=True)
    replica: Mapped[str | None] = mapped_column(String(255), nullable=True)
    time: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    data_json: Mapped[str] = mapped_column(Text, default="{}")


@dataclass
class Deployment:
    name: str
    infra: str
    status: str
    spec: dict[str, Any]
    plan: dict[str, Any]
    targets: list[dict[str, Any]]
    blocklist: list[tuple[str, str, str, bool]]
    router_host: str
    router_port: int | None
    message: str
    created_at: float
    updated_at: float

    @property
    def endpoint(self) -> str | None:
        """The router's OpenAI base URL (ends in /v1), once it has a port."""
        if self.router_port is None:
            return None
        return f"http://{self.router_host}:{self.router_port}/v1"


@dataclass
class Replica:
    id: int
    deployment: str
    name: str
    target: int
    cloud: str
    region: str
    instance_type: str
    spot: bool
    status: str
    url: str | None
    handle: dict[str, Any] | None
    failures: int
    message: str
    created_at: float
    updated_at: float
    launched_at: float | None
    ready_at: float | None

    @property
    def offering_key(self) -> tuple[str, str, str, bool]:
        return (self.cloud, self.region, self.instance_type, self.spot)

    @property
    def engine_urls(self) -> list[str]:
        """Its engines' base URLs: one, or one per engine of a data-parallel replica."""
        urls = (self.handle or {}).get("info", {}).get("urls")
        return list(urls) if urls else [self.url] if self.url else []


@dataclass
class Event:
    id: int
    deployment: str
    replica: str | None
    time: float
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


def default_home() -> Path:
    """The broker's own directory: $SKYBROKER_HOME, else ~/.skybroker."""
    return Path(os.environ.get("SKYBROKER_HOME") or Path.home() / ".skybroker")


def default_url() -> str:
    return f"sqlite:///{default_home() / 'state.db'}"


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(url, connect_args={"timeout": 30} if is_sqlite else {})
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            if ":memory:" not in url:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


class Store:
    """Deployments, replicas and events in one SQL database (thread-safe: a session per call)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_url()
        self.engine = _make_engine(self.url)
        _Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- deployments -------------------------------------------------------------------------

    def create_deployment(
        self,
        name: str,
        infra: str,
        spec: dict[str, Any],
        plan: dict[str, Any],
        targets: list[dict[str, Any]],
        status: str = DeploymentStatus.PROVISIONING,
    ) -> Deployment:
        now = time.time()
        row = _DeploymentRow(
            name=name,
            infra=infra,
            status=status,
            spec_json=json.dumps(spec),
            plan_json=json.dumps(plan),
            targets_json=json.dumps(targets),
            blocklist_json="[]",
            message="",
            created_at=now,
            updated_at=now,
        )
        with Session(self.engine) as s:
            s.add(row)
            try:
                s.commit()
            except IntegrityError as e:
                raise StateError(f"deployment {name!r} already exists") from e
            return _deployment(row)

    def get_deployment(self, name: str) -> Deployment | None:
        with Session(self.engine) as s:
            row = self._deployment_row(s, name)
            return _deployment(row) if row else None

    def list_deployments(self) -> list[Deployment]:
        with Session(self.engine) as s:
            rows = s.scalars(select(_DeploymentRow).order_by(_DeploymentRow.id)).all()
            return [_deployment(r) for r in rows]

    def update_deployment(self, name: str, **fields: Any) -> Deployment:
        """Set columns by Deployment field name (spec/plan/targets/blocklist are JSON-encoded)."""
        with Session(self.engine) as s:
            row = self._require(s, name)
            for key, value in fields.items():
                if key in ("spec", "plan", "targets", "blocklist"):
                    setattr(row, f"{key}_json", json.dumps(value))
                elif hasattr(_DeploymentRow, key) and key not in ("id", "name"):
                    setattr(row, key, value)
                else:
                    raise StateError(f"unknown deployment field {key!r}")
            row.updated_at = time.time()
            s.commit()
            return _deployment(row)

    def delete_deployment(self, name: str) -> bool:
        """Remove a deployment with its replicas and events; False if it did not exist."""
        with Session(self.engine) as s:
            row = self._deployment_row(s, name)
            if row is None:
                return False
            s.delete(row)
            s.commit()
            return True

    # -- replicas ----------------------------------------------------------------------------

    def add_replica(
        self,
        deployment: str,
        target: int,
        key: tuple[str, str, str, bool],
        status: str = ReplicaStatus.PENDING,
    ) -> Replica:
        """A new replica row; its name `<deployment>-<id>` is unique and stable."""
        now = time.time()
        with Session(self.engine) as s:
            dep = self._require(s, deployment)
            cloud, region, instance_type, spot = key
            row = _ReplicaRow(
                deployment_id=dep.id,
                name=f"tmp-{now}-{id(s)}",
                target=target,
                cloud=cloud,
                region=region,
                instance_type=instance_type,
                spot=bool(spot),
                status=status,
                failures=0,
                message="",
                created_at=now,
                updated_at=now,
            )
            s.add(row)
            s.flush()
            row.name = f"{deployment}-{row.id}"
            s.commit()
            return _replica(row, deployment)

    def get_replica(self, name: str) -> Replica | None:
        with Session(self.engine) as s:
            row = s.scalars(select(_ReplicaRow).where(_ReplicaRow.name == name)).first()
            return _replica(row, row.deployment.name) if row else None

    def list_replicas(self, deployment: str, live_only: bool = True) -> list[Replica]:
        with Session(self.engine) as s:
            dep = self._require(s, deployment)
            q = select(_ReplicaRow).where(_ReplicaRow.deployment_id == dep.id)
            if live_only:
                q = q.where(_ReplicaRow.status.in_([str(x) for x in LIVE_REPLICA_STATUSES]))
            rows = s.scalars(q.order_by(_ReplicaRow.id)).all()
            return [_replica(r, deployment) for r in rows]

    def update_replica(self, name: str, **fields: Any) -> Replica:
        with Session(self.engine) as s:
            row = s.scalars(select(_ReplicaRow).where(_ReplicaRow.name == name)).first()
            if row is None:
                raise StateError(f"unknown replica {name!r}")
            for key, value in fields.items():
                if key == "handle":
                    row.handle_json = None if value is None else json.dumps(value)
                elif hasattr(_ReplicaRow, key) and key not in ("id", "name", "deployment_id"):
                    setattr(row, key, value)
                else:
                    raise StateError(f"unknown replica field {key!r}")
            row.updated_at = time.time()
            s.commit()
            return _replica(row, row.deployment.name)

    # -- events ------------------------------------------------------------------------------

    def add_event(
        self,
        deployment: str,
        kind: str,
        message: str,
        replica: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> Event:
        with Session(self.engine) as s:
            dep = self._require(s, deployment)
            row = _EventRow(
                deployment_id=dep.id,
                replica=replica,
                time=time.time(),
                kind=kind,
                message=message,
                data_json=json.dumps(data or {}),
            )
            s.add(row)
            s.commit()
            return _event(row, deployment)

    def list_events(self, deployment: str, limit: int | None = None) -> list[Event]:
        """Events of a deployment, oldest first (the last `limit` ones if given)."""
        with Session(self.engine) as s:
            dep = self._require(s, deployment)
            q = select(_EventRow).where(_EventRow.deployment_id == dep.id)
            rows = list(s.scalars(q.order_by(_EventRow.id.desc()).limit(limit)).all())
            return [_event(r, deployment) for r in reversed(rows)]

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _deployment_row(s: Session, name: str) -> _DeploymentRow | None:
        return s.scalars(select(_DeploymentRow).where(_DeploymentRow.name == name)).first()

    def _require(self, s: Session, name: str) -> _DeploymentRow:
        row = self._deployment_row(s, name)
        if row is None:
            raise StateError(f"unknown deployment {name!r}")
        return row


def _deployment(r: _DeploymentRow) -> Deployment:
    return Deployment(
        name=r.name,
        infra=r.infra,
        status=r.status,
        spec=json.loads(r.spec_json),
        plan=json.loads(r.plan_json),
        targets=json.loads(r.targets_json),
        blocklist=[tuple(k) for k in json.loads(r.blocklist_json)],  # type: ignore[misc]
        router_host=r.router_host,
        router_port=r.router_port,
        message=r.message,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def _replica(r: _ReplicaRow, deployment: str) -> Replica:
    return Replica(
        id=r.id,
        deployment=deployment,
        name=r.name,
        target=r.target,
        cloud=r.cloud,
        region=r.region,
        instance_type=r.instance_type,
        spot=r.spot,
        status=r.status,
        url=r.url,
        handle=json.loads(r.handle_json) if r.handle_json else None,
        failures=r.failures,
        message=r.message,
        created_at=r.created_at,
        updated_at=r.updated_at,
        launched_at=r.launched_at,
        ready_at=r.ready_at,
    )


def _event(r: _EventRow, deployment: str) -> Event:
    return Event(
        id=r.id,
        deployment=deployment,
        replica=r.replica,
        time=r.time,
        kind=r.kind,
        message=r.message,
        data=json.loads(r.data_json),
    )
