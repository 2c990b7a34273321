"""The tenant context on Citus: the signed context refused, the unsigned one with plain readers.

The signed tenant context (migration 0004, the default) is **refused** on Citus
(:class:`~rtv_db.errors.CitusSignedContextError`, before anything changes): its readers cannot
verify a token on a worker the way they do on PostgreSQL (the keys would have to be read from a
Citus table inside a shard query, which Citus forbids; the pid and transaction checks have no
sound worker-side equivalent that could be tested here). In unsigned mode the distribution
replaces the three readers the policies call with the plain, table-free readers of revision 0002
(:data:`PLAIN_CONTEXT_READERS`), so that the workers need nothing from ``rtv_secret``. See
docs/citus.md, "The signed tenant context on Citus".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection, text

from ..errors import CitusSignedContextError

if TYPE_CHECKING:  # plan.py imports this module: the plan's type is for annotations only
    from .plan import DistributionPlan

# The readers the policies call, in the plain form of revision 0002 (read app.* settings, no
# table, SECURITY INVOKER): what a worker can evaluate inside a shard query. Installed by the
# distribution in unsigned mode only; signed mode is refused on Citus (refuse_signed_context).
PLAIN_CONTEXT_READERS: dict[str, str] = {
    "rtv.current_tenant_id()": """
        CREATE OR REPLACE FUNCTION rtv.current_tenant_id() RETURNS uuid
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$ SELECT rtv.to_uuid_or_null(current_setting('app.current_tenant_id', true)) $$""",
    "rtv.current_platform_account_id()": """
        CREATE OR REPLACE FUNCTION rtv.current_platform_account_id() RETURNS uuid
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$ SELECT rtv.to_uuid_or_null(current_setting('app.current_platform_account_id', true)) $$""",
    "rtv.current_lane()": """
        CREATE OR REPLACE FUNCTION rtv.current_lane() RETURNS text
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$
            SELECT CASE WHEN lane IN ('api', 'browser') THEN lane END
            FROM current_setting('app.current_lane', true) AS lane
        $$""",
    # The audit labels (migration 0005 made them read the spent token's row, on the coordinator).
    "rtv.current_user_id()": """
        CREATE OR REPLACE FUNCTION rtv.current_user_id() RETURNS text
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$ SELECT NULLIF(current_setting('app.current_user_id', true), '') $$""",
    "rtv.current_correlation_id()": """
        CREATE OR REPLACE FUNCTION rtv.current_correlation_id() RETURNS text
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$ SELECT NULLIF(current_setting('app.correlation_id', true), '') $$""",
}
_SECRET_SCHEMA = "rtv_secret"


_READERS_SQL = text(
    """
    SELECT p.oid::regprocedure::text, p.prosrc, p.prosecdef
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname || '.' || p.proname || '()' = ANY(:names) AND p.pronargs = 0
    ORDER BY 1
    """
)


def database_context_mode(conn: Connection) -> str | None:
    """The tenant context mode the database enforces (``signed``/``unsigned``), None before 0004."""
    # A role without EXECUTE on it (verify may run as any catalog reader) cannot tell: None.
    if not conn.exec_driver_sql(
        "SELECT CASE WHEN to_regnamespace('rtv') IS NULL THEN false"
        " WHEN NOT has_schema_privilege(to_regnamespace('rtv'), 'USAGE') THEN false"
        " WHEN to_regprocedure('rtv.context_mode()') IS NULL THEN false"
        " ELSE has_function_privilege(to_regprocedure('rtv.context_mode()'), 'EXECUTE') END"
    ).scalar():
        return None
    mode = conn.exec_driver_sql("SELECT rtv.context_mode()").scalar()
    return None if mode is None else str(mode)


def _signed_readers(conn: Connection) -> tuple[str, ...]:
    """Readers the policies call whose definition is not the plain one (they verify a token)."""
    rows = conn.execute(_READERS_SQL, {"names": list(PLAIN_CONTEXT_READERS)})
    return tuple(sig for sig, source, secdef in rows if secdef or _SECRET_SCHEMA in (source or ""))


def refuse_signed_context(mode: str | None) -> None:
    """Raise :class:`CitusSignedContextError` when ``mode`` is the signed tenant context."""
    if mode == "signed":
        raise CitusSignedContextError(
            "the signed tenant context (the default) is not supported on Citus: its readers cannot verify the"
            " token on the workers (no keys there, and Citus forbids reading a reference table from a shard"
            " query), so every tenant query would fail. Nothing was changed. To run on Citus, set"
            " RTV_DB_CONTEXT_MODE=unsigned and run rtv-db migrate again; this reopens the forged-context hole"
            " (rtv-db verify reports it). See docs/citus.md, 'The signed tenant context on Citus'."
        )


def apply_context_readers(conn: Connection, plan: DistributionPlan) -> list[str]:
    """Replace ``plan.context_readers`` by :data:`PLAIN_CONTEXT_READERS` (unsigned mode only).

    Raises :class:`CitusSignedContextError` in signed mode: the plain readers would trust any
    ``SET LOCAL``, which is what signed mode exists to prevent.
    """
    refuse_signed_context(plan.context_mode)
    done = []
    for signature in plan.context_readers:
        conn.exec_driver_sql(PLAIN_CONTEXT_READERS[signature], execution_options={"no_parameters": True})
        done.append(f"function {signature}: the plain reader (unsigned mode; no rtv_secret on the workers)")
    return done
