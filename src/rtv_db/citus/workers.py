"""The runtime role on the workers: function grants and database privileges are per node.

:func:`worker_exposure` names the workers on which the runtime role keeps what the bootstrap
revokes on the coordinator (``rtv-db verify`` reports them); :func:`harden_workers` runs the
bootstrap's hardening there (``rtv-db migrate``, after the distribution).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from ..config import ROLE_NAME
from ..errors import MigrationError
from .apply import _literal

# What the runtime role may still do on a worker that the bootstrap forbids on the coordinator:
# read other sessions' query text, signal them, take advisory locks; and, on the coordinator and
# the workers, run any SQL on the workers through Citus's run_command_* functions.
_WORKER_EXPOSURE_SQL = (
    "SELECT has_function_privilege(%(role)s, 'pg_catalog.pg_stat_get_activity(integer)', 'EXECUTE')"
    " OR has_function_privilege(%(role)s, 'pg_catalog.pg_terminate_backend(integer, bigint)', 'EXECUTE')"
    " OR has_function_privilege(%(role)s, 'pg_catalog.pg_advisory_lock(bigint)', 'EXECUTE')"
    " OR has_function_privilege(%(role)s, 'pg_catalog.run_command_on_workers(text, boolean)', 'EXECUTE')"
    " OR has_database_privilege('public', current_database(), 'TEMPORARY')"
)


def worker_exposure(conn: Connection, runtime_role: str) -> list[str]:
    """The workers (host:port) on which ``runtime_role`` keeps a privilege the bootstrap revokes."""
    if not ROLE_NAME.match(runtime_role):
        raise MigrationError(f"refusing role name {runtime_role!r}")
    command = _WORKER_EXPOSURE_SQL % {"role": _literal(runtime_role)}
    rows = conn.execute(text("SELECT nodename, nodeport, success, result FROM run_command_on_workers(:c)"),
                        {"c": command})
    return [f"{host}:{port}" for host, port, ok, result in rows if not ok or result != "f"]


def harden_workers(conn: Connection, hardening_sql: str, *, runtime_role: str) -> list[str]:
    """Run the bootstrap's per-node hardening (``hardening_sql``) on every worker that needs it.

    Function grants and database privileges are per node: the bootstrap's revokes (session
    functions, run_command_*, TEMPORARY) hold on the coordinator only, yet a query pushed down
    to the shards runs its function calls on the workers as the runtime role.
    """
    if conn.exec_driver_sql("SELECT to_regprocedure('pg_catalog.run_command_on_workers(text, boolean)')").scalar() is None:
        return []  # not Citus
    exposed = worker_exposure(conn, runtime_role)
    if not exposed or not hardening_sql.strip():
        return []
    rows = conn.execute(text("SELECT nodename, nodeport, success, result FROM run_command_on_workers(:c)"),
                        {"c": hardening_sql}).all()
    failed = [f"{h}:{p}: {r}" for h, p, ok, r in rows if not ok]
    if failed:
        raise MigrationError("hardening the workers failed:\n  - " + "\n  - ".join(failed))
    left = worker_exposure(conn, runtime_role)
    if left:
        raise MigrationError(f"after hardening, {runtime_role} still holds revoked privileges on {', '.join(left)}")
    return [f"workers {', '.join(exposed)}: session functions, run_command_* and TEMPORARY revoked from {runtime_role}"]
