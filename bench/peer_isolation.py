"""The peers' isolation, checked with tiny scripts on their bench databases (bench/peers.py), or
read from their source where a check would need more than this run has (a PgBouncer).

Each finding: (peer, question, answer, how), ``how`` being ``checked`` (the script below ran and
saw it) or ``read from source``. A check that fails to run says so rather than guessing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from rtv_db.config import to_sqlalchemy_url

from .peers import Peers

__all__ = ["check", "markdown"]


def _distinct(session: Session, model: Any, col: str) -> int:
    return int(session.execute(select(func.count(func.distinct(getattr(model, col))))).scalar_one())


def _switch(s: Session, model: Any, col: str, to_other: str, to_all: str) -> tuple[Any, int]:
    """Run ``to_other`` then read one row's tenant; run ``to_all`` then count the tenants seen."""
    s.execute(text(to_other))
    seen = Session.execute(s, select(getattr(model, col)).limit(1)).scalar_one()
    s.execute(text(to_all))
    return seen, _distinct(s, model, col)


def _st(peers: Peers, a: uuid.UUID, b: uuid.UUID) -> list[tuple[str, str]]:
    from sqlalchemy_tenants.managers import PostgresManager

    model = peers.models["sqlalchemy_tenants"]
    engine = create_engine(to_sqlalchemy_url(peers.urls["sqlalchemy_tenants"]), pool_size=1, max_overflow=0)
    manager = PostgresManager.from_engine(engine, schema_name="public")
    out = []
    try:
        with manager.new_tenant_session(a) as s:
            s.execute(text("SELECT 1"))
            s.commit()  # a tenant session that commits (any write does)
        with manager.new_session() as s:
            who = s.execute(text("SELECT current_user")).scalar_one()
        out.append(("Does the tenant survive pool checkout?",
                    f"yes, once a tenant session commits: SET SESSION ROLE is session state, and the next checkout "
                    f"(here the manager's admin session) runs as `{who}`; a session that only reads ends in ROLLBACK, "
                    "which reverts it"))
        fresh = PostgresManager.from_engine(create_engine(to_sqlalchemy_url(peers.urls["sqlalchemy_tenants"])), schema_name="public")
        with fresh.new_session() as s:
            n = _distinct(s, model, "tenant")
        fresh.engine.dispose()
        out.append(("Is a missing tenant refused?",
                    f"no: a session without a tenant runs as the login role, which owns the table (RLS enabled, "
                    f"not forced), and reads every tenant's rows ({n} tenants seen)"))
        with manager.new_tenant_session(a) as s:
            seen, n = _switch(s, model, "tenant", f'SET ROLE "tenant_{b}"', "RESET ROLE")
        out.append(("Can SQL in a tenant's session switch tenants?",
                    f"yes: `SET ROLE \"tenant_<other>\"` reads the other tenant's rows ({'its row seen' if seen == b else seen}), "
                    f"`RESET ROLE` returns to the owner and reads all ({n} tenants): the login role is a member of every tenant role"))
    finally:
        engine.dispose()
    return out


def _rls(peers: Peers, a: uuid.UUID, b: uuid.UUID) -> list[tuple[str, str]]:
    from pydantic import BaseModel
    from rls.rls_session import RlsSession

    class Ctx(BaseModel):
        client_id: uuid.UUID

    model = peers.models["rls"]
    out = []
    fresh = create_engine(to_sqlalchemy_url(peers.urls["rls"]), pool_size=1, max_overflow=0)
    try:
        with Session(fresh) as s:
            n0 = _distinct(s, model, "client_id")
        with RlsSession(context=Ctx(client_id=a), bind=fresh) as s:
            s.execute(select(model.id).limit(1)).all()
        with Session(fresh) as s:  # the same pooled connection, no context: the read-only session rolled back
            n_rolled_back = _distinct(s, model, "client_id")
        with RlsSession(context=Ctx(client_id=a), bind=fresh) as s:
            s.execute(select(model.id).limit(1)).all()
            s.commit()  # a session that commits (any write does)
        with Session(fresh) as s:  # the same pooled connection, no context
            n1 = _distinct(s, model, "client_id")
            mine = s.execute(select(model.client_id).limit(1)).scalar_one_or_none()
        out.append(("Is a missing tenant refused?",
                    f"not refused, but on a fresh connection it reads nothing ({n0} tenants seen): NULLIF(current_setting(...), '') is NULL"))
        out.append(("Does the tenant survive pool checkout?",
                    "yes, once a session commits: the context is set with set_config(..., false), session level; a plain "
                    f"session on the next checkout of the same pooled connection reads {n1} tenant "
                    f"({'the previous tenant' if mine == a else mine}); after a read-only session (ROLLBACK) it reads {n_rolled_back}"))
        with fresh.connect() as c:
            c.execute(text(f"SELECT set_config('rls.client_id', '{a}', false)"))
            plan = "\n".join(r[0] for r in c.execute(text("EXPLAIN SELECT * FROM brand_kits ORDER BY id LIMIT 100")))
        out.append(("Can the policy alone use the tenant index?",
                    ("no: " if "Seq Scan" in plan else "yes: ") + "`EXPLAIN` of a 100-row list that relies on RLS alone (as its docs "
                    "show, no tenant predicate) plans " + ("a Seq Scan" if "Seq Scan" in plan else plan.splitlines()[0])
                    + ": the policy's `OR current_setting('rls.bypass_rls') ...` arm is no index condition"))
        with RlsSession(context=Ctx(client_id=a), bind=fresh) as s:
            s.execute(select(model.id).limit(1)).all()
            other, n = _switch(s, model, "client_id", f"SELECT set_config('rls.client_id', '{b}', false)",
                               "SELECT set_config('rls.bypass_rls', 'true', false)")
        out.append(("Can SQL in a tenant's session switch tenants?",
                    f"yes: `set_config('rls.client_id', <other>, false)` reads the other tenant ({'its row seen' if other == b else other}); "
                    f"`set_config('rls.bypass_rls', 'true', false)` reads every tenant ({n} seen): the policy trusts plain settings"))
    finally:
        fresh.dispose()
    return out


_READ = {
    "sqlalchemy_tenants": [
        ("Behind PgBouncer transaction mode?", "unsafe: `SET SESSION ROLE` is session state; a committed tenant session leaves "
         "the role on the server connection for whichever client's transaction gets it next"),
        ("Owner / superuser bypass?", "the app logs in as the table's owner and RLS is ENABLE without FORCE: the owner bypasses; a superuser always does"),
        ("Tenants as roles", "one PostgreSQL role per tenant (`CREATE ROLE tenant_<id>`), cluster-wide; the app's login role needs CREATEROLE and is granted every tenant role"),
    ],
    "rls": [
        ("Behind PgBouncer transaction mode?", "unsafe: `set_config(..., false)` is session level; the settings stay on the server "
         "connection after the transaction, for the next client of that connection"),
        ("Owner / superuser bypass?", "ENABLE + FORCE (its create_policies): the owner is bound; a superuser always bypasses; "
         "every policy has an `OR rls.bypass_rls = true` escape that any SQL can set"),
    ],
}


def check(peers: Peers, tenants: list[uuid.UUID]) -> dict[str, list[dict[str, str]]]:
    a, b = tenants[0], tenants[1]
    runs: dict[str, Callable[..., list[tuple[str, str]]]] = {"sqlalchemy_tenants": _st, "rls": _rls}
    out: dict[str, list[dict[str, str]]] = {}
    for peer, fn in runs.items():
        rows = []
        try:
            rows = [{"question": q, "answer": ans, "how": "checked"} for q, ans in fn(peers, a, b)]
        except Exception as exc:  # a check that cannot run is reported, not guessed
            rows = [{"question": "checks", "answer": f"could not run: {type(exc).__name__}: {exc}"[:300], "how": "checked"}]
        rows += [{"question": q, "answer": ans, "how": "read from source"} for q, ans in _READ[peer]]
        out[peer] = rows
    return out


def markdown(findings: dict[str, list[dict[str, str]]]) -> list[str]:
    out = ["| peer | question | answer | how |", "|---|---|---|---|"]
    for peer, rows in findings.items():
        for r in rows:
            out.append(f"| {peer} | {r['question']} | {r['answer']} | {r['how']} |")
    return out
