"""Peer libraries on the same server and table shape: sqlalchemy-tenants 0.2.0 and rls 0.3.2.

Each peer gets a database of its own (rtv-db's are untouched), owned by a login role of its own
(NOSUPERUSER), with brand_kits' columns, primary key ``(tenant, id)``, unique ``(tenant, name)``
and checks (no foreign key: there is no clients table), a copy of the main dataset's brand kits,
and the RLS its own docs prescribe:

* **sqlalchemy-tenants**: the tenant column must be called ``tenant``; ``@with_rls`` on the model;
  the DDL its Alembic directives emit (``get_process_revision_directives``), taken from the
  library itself: the ``sqlalchemy_tenants_get_tenant()`` function (``current_user`` minus the
  ``tenant_`` prefix), ``ENABLE ROW LEVEL SECURITY`` and its policy ``tenant = (select
  sqlalchemy_tenants_get_tenant()::uuid)``; one role per tenant made by
  ``PostgresManager.create_tenant`` (the login role needs CREATEROLE and is granted every tenant
  role); a session is ``manager.new_tenant_session(tenant)``, which runs ``SET SESSION ROLE``.
* **rls**: ``__rls_policies__ = [Permissive(ConditionArg("client_id", UUID), Command.all,
  column("client_id") == x)]``, ``register_rls(Base)`` and ``Base.metadata.create_all`` (its
  ``after_create`` hook: ENABLE + FORCE and the policy, with its ``rls.bypass_rls`` escape);
  sessions from ``RlsSessioner(sessionmaker(class_=RlsSession), ContextGetter)``, which run
  ``set_config('rls.client_id', ..., false)`` before the first statement.

Variants (ORM, one held pool per variant with rtv-db's pool settings): ``baseline`` (B0,
hand-written psycopg, system role), ``sqlalchemy_orm`` (plain SQLAlchemy ORM on the main
database, system role, a mapped class of its own: no isolation), ``orm`` (rtv-db:
``tenant_session`` + ``session.begin()``), ``sqlalchemy_tenants``, ``rls``. Point read:
``session.get`` by primary key; list: ``select(Model).where(tenant == t).order_by(id).limit(100)``
(the same explicit statement for all; rtv-db adds its criteria on top).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import JSON, DateTime, Text, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, sessionmaker

from rtv_db import BrandKit, EngineOptions, TenantContext, tenant_session
from rtv_db.config import to_libpq_url, to_sqlalchemy_url

from .env import BenchServer, Dataset
from .variants import LIST_SQL, POINT_SQL, Op, Variants, _check, _database, _plain_engine, _psycopg

__all__ = ["available", "Peers", "setup", "variants"]

COPY_COLUMNS = "id, name, tone, colors, logo_refs, created_at, updated_at"


def available() -> str | None:
    """None if both peers import, else why not (the bench extra is not installed)."""
    try:
        import rls.rls_session  # noqa: F401
        import sqlalchemy_tenants  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} not installed (pip install -e '.[bench]')"
    return None


def _table_ddl(tenant_col: str) -> str:
    """brand_kits as migration 0001 creates it (copied on purpose: the peers' own table), tenant column renamed, no FK."""
    return f"""
    CREATE TABLE brand_kits (
        {tenant_col} uuid NOT NULL,
        id         uuid        NOT NULL DEFAULT gen_random_uuid(),
        name       text        NOT NULL,
        tone       jsonb       NOT NULL DEFAULT '{{"voice": "neutral", "personality": []}}'::jsonb,
        colors     jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
        logo_refs  jsonb       NOT NULL DEFAULT '[]'::jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY ({tenant_col}, id),
        UNIQUE ({tenant_col}, name),
        CHECK (length(name) BETWEEN 1 AND 200),
        CHECK (jsonb_typeof(tone) = 'object'),
        CHECK (jsonb_typeof(colors) = 'object'),
        CHECK (jsonb_typeof(logo_refs) = 'array')
    )"""


def _columns(base: type[DeclarativeBase], tenant_col: str) -> dict[str, Any]:
    from sqlalchemy import Uuid

    return {
        "__tablename__": "brand_kits",
        tenant_col: mapped_column(Uuid, primary_key=True),
        "id": mapped_column(Uuid, primary_key=True),
        "name": mapped_column(Text),
        "tone": mapped_column(JSON),
        "colors": mapped_column(JSON),
        "logo_refs": mapped_column(JSON),
        "created_at": mapped_column(DateTime(timezone=True)),
        "updated_at": mapped_column(DateTime(timezone=True)),
    }


class Peers:
    """The peers' databases, roles, engines and mapped classes."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}
        self.admin_urls: dict[str, str] = {}
        self.tenant_roles: list[str] = []
        self.models: dict[str, Any] = {}


def _login_role(server: BenchServer, prefix: str, *attrs: str) -> tuple[str, str]:
    role, password = f"{prefix}_{secrets.token_hex(4)}", secrets.token_hex(12)
    with server.admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS " + " ".join(attrs) + " PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))

    def drop() -> None:
        with server.admin() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))

    server.after_close(drop)
    return role, password


def _copy_kits(server: BenchServer, main: Dataset, database: str, tenant_col: str) -> None:
    with server.admin(main.name) as src, server.admin(database) as dst:
        with src.cursor().copy(f"COPY (SELECT client_id, {COPY_COLUMNS} FROM brand_kits) TO STDOUT (FORMAT BINARY)") as out, \
                dst.cursor().copy(f"COPY brand_kits ({tenant_col}, {COPY_COLUMNS}) FROM STDIN (FORMAT BINARY)") as into:
            for block in out:
                into.write(block)
        dst.execute("ANALYZE brand_kits")


def _setup_sqlalchemy_tenants(server: BenchServer, main: Dataset, peers: Peers, tenants: list[uuid.UUID]) -> None:
    from sqlalchemy_tenants import with_rls
    from sqlalchemy_tenants.core import _GET_TENANT_FUNCTION_TEMPLATE, GET_TENANT_FUNCTION_NAME, TENANT_ROLE_PREFIX, get_table_policy
    from sqlalchemy_tenants.managers import PostgresManager

    role, password = _login_role(server, "bench_st", "CREATEROLE")
    database = server.create_database("st", owner=role)
    url = make_url(server.url_for(database)).set(username=role, password=password).render_as_string(hide_password=False)
    peers.urls["sqlalchemy_tenants"], peers.admin_urls["sqlalchemy_tenants"] = url, server.url_for(database)
    with psycopg.connect(to_libpq_url(url), autocommit=True) as conn:  # the migration, as the app's own role
        conn.execute(_table_ddl("tenant"))
        conn.execute(_GET_TENANT_FUNCTION_TEMPLATE.format(name=GET_TENANT_FUNCTION_NAME, tenant_role_prefix=TENANT_ROLE_PREFIX))
        conn.execute('ALTER TABLE "brand_kits" ENABLE ROW LEVEL SECURITY')
        conn.execute(get_table_policy(table_name="brand_kits", column_type=uuid.UUID))
    _copy_kits(server, main, database, "tenant")

    class Base(DeclarativeBase):
        pass

    model = with_rls(type("StBrandKit", (Base,), _columns(Base, "tenant")))
    engine = create_engine(to_sqlalchemy_url(url), **EngineOptions().engine_kwargs())
    manager = PostgresManager.from_engine(engine, schema_name="public")
    existing = manager.list_tenants()
    for t in tenants:
        if str(t) not in existing:
            manager.create_tenant(t)
            peers.tenant_roles.append(f"{TENANT_ROLE_PREFIX}{t}")
    engine.dispose()

    def drop_tenant_roles() -> None:
        with server.admin() as conn:
            for r in peers.tenant_roles:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(r)))

    server.after_close(drop_tenant_roles)  # runs before the login role's drop (reverse order)
    peers.models["sqlalchemy_tenants"] = model


def _setup_rls(server: BenchServer, main: Dataset, peers: Peers) -> None:
    from sqlalchemy import UUID, column

    from rls.register_rls import register_rls
    from rls.schemas import Command, ConditionArg, Permissive

    role, password = _login_role(server, "bench_rls")
    database = server.create_database("rls", owner=role)
    url = make_url(server.url_for(database)).set(username=role, password=password).render_as_string(hide_password=False)
    peers.urls["rls"], peers.admin_urls["rls"] = url, server.url_for(database)

    class Base(DeclarativeBase):
        pass

    attrs = _columns(Base, "client_id")
    attrs["__rls_policies__"] = [Permissive(condition_args=[ConditionArg(comparator_name="client_id", type=UUID)],
                                            cmd=[Command.all], custom_expr=lambda x: column("client_id") == x,
                                            custom_policy_name="tenant")]
    model = type("RlsBrandKit", (Base,), attrs)
    register_rls(Base)
    with psycopg.connect(to_libpq_url(url), autocommit=True) as conn:
        conn.execute(_table_ddl("client_id"))  # the same DDL as the others: create_all skips the table...
    engine = create_engine(to_sqlalchemy_url(url))
    Base.metadata.create_all(engine)  # ...and its after_create hook (register_rls) enables, forces and adds the policy
    engine.dispose()
    _copy_kits(server, main, database, "client_id")
    peers.models["rls"] = model


def setup(server: BenchServer, main: Dataset, tenants: list[uuid.UUID]) -> Peers:
    peers = Peers()
    _setup_sqlalchemy_tenants(server, main, peers, tenants)
    _setup_rls(server, main, peers)
    return peers


class _PlainBase(DeclarativeBase):
    pass


PlainBrandKit = type("PlainBrandKit", (_PlainBase,), _columns(_PlainBase, "client_id"))


def variants(peers: Peers, runtime_url: str, system_url: str, ops: list[Op], limit: int | None,
             url: Callable[[str], str] = lambda u: u) -> Variants:
    """The ORM point read (``limit`` None) or list of each library; ``url`` maps every URL (for the wire counter)."""
    from rls.rls_session import RlsSession
    from rls.rls_sessioner import ContextGetter, RlsSessioner
    from pydantic import BaseModel
    from sqlalchemy_tenants.managers import PostgresManager

    v = Variants()
    kwargs = EngineOptions().engine_kwargs()

    def engine_for(u: str) -> Any:
        e = create_engine(to_sqlalchemy_url(url(u)), **kwargs)
        v.on_close(e.dispose)
        return e

    def read(session: Session, model: Any, tenant_col: str, op: Op) -> None:
        if limit is None:
            kit = session.get(model, (op.tenant, op.row))
            _check(kit is not None and getattr(kit, tenant_col) == op.tenant, f"{model.__name__} get")
        else:
            col = getattr(model, tenant_col)
            kits = session.execute(select(model).where(col == op.tenant).order_by(model.id).limit(limit)).scalars().all()
            _check(len(kits) == limit and getattr(kits[0], tenant_col) == op.tenant, f"{model.__name__} list")

    base = _psycopg(url(system_url), v)

    def baseline(i: int) -> None:
        op = ops[i]
        rows = base.execute(POINT_SQL if limit is None else LIST_SQL, (op.tenant, op.row) if limit is None else (op.tenant, limit)).fetchall()
        base.commit()
        _check(len(rows) == (limit or 1) and rows[0][0] == op.tenant, "baseline")

    plain = sessionmaker(bind=_plain_engine(url(system_url), v))
    db = _database(url(runtime_url), v)

    def rtv_orm(i: int) -> None:
        op = ops[i]
        with tenant_session(db, TenantContext(op.tenant)) as session, session.begin():
            read(session, BrandKit, "client_id", op)

    def sqlalchemy_orm(i: int) -> None:
        with plain() as session:
            read(session, PlainBrandKit, "client_id", ops[i])

    manager = PostgresManager.from_engine(engine_for(peers.urls["sqlalchemy_tenants"]), schema_name="public")

    def sqlalchemy_tenants(i: int) -> None:
        op = ops[i]
        with manager.new_tenant_session(op.tenant, create_if_missing=False) as session:
            read(session, peers.models["sqlalchemy_tenants"], "tenant", op)

    class Ctx(BaseModel):
        client_id: uuid.UUID

    class Getter(ContextGetter):
        def get_context(self, *args: Any, **kw: Any) -> Ctx:
            return Ctx(client_id=kw["tenant"])

    sessioner = RlsSessioner(sessionmaker(class_=RlsSession, autoflush=False, bind=engine_for(peers.urls["rls"])), Getter())

    def rls(i: int) -> None:
        op = ops[i]
        with sessioner(tenant=op.tenant) as session:
            read(session, peers.models["rls"], "client_id", op)

    for name, fn in (("baseline", baseline), ("sqlalchemy_orm", sqlalchemy_orm), ("orm", rtv_orm),
                     ("sqlalchemy_tenants", sqlalchemy_tenants), ("rls", rls)):
        v.add(name, fn)
    return v


_NAMES = {"baseline": "B0: hand-written psycopg, system role", "sqlalchemy_orm": "plain SQLAlchemy ORM, no isolation",
          "orm": "rtv-db ORM (signed)", "sqlalchemy_tenants": "sqlalchemy-tenants 0.2.0", "rls": "rls 0.3.2"}


def markdown(p: dict[str, Any]) -> list[str]:
    from .peer_isolation import markdown as isolation_markdown

    out = ["## Peers: ORM point read and list, side by side", ""]
    if "skipped" in p:
        return out + [f"Skipped: {p['skipped']}."]
    out += ["Each peer set up as its docs say, in a database of its own on the same server, same table shape and data "
            f"(setup {p['setup_seconds']} s); the five variants interleaved in one run. Ratio = median / B0's median; "
            "the last column is the median / plain SQLAlchemy ORM's.", "",
            "| workload | variant | median µs | ratio to B0 | ratio to plain ORM | round trips/op | statements/op |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for key, title in (("get", "`session.get` by id"), ("list", "100-row select")):
        lat, wire = p[key]["latency"], p[key]["wire"]
        plain = lat["sqlalchemy_orm"]["median_us"]
        for name, s in lat.items():
            w = wire.get(name, {})
            out.append(f"| {title} | {_NAMES.get(name, name)} | {s['median_us']:.1f} | {s['ratio']:.3f} | {s['median_us'] / plain:.3f} | "
                       f"{w.get('round_trips_per_op', '-')} | {w.get('statements_per_op', '-')} |")
    out += ["", "Their isolation, beside the figures (rtv-db's: README, \"Threat model\"): checked = a tiny script in this run "
            "(bench/peer_isolation.py) saw it; read from source = not run here.", ""]
    return out + isolation_markdown(p["isolation"])
