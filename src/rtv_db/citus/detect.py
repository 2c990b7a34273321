"""Whether the server is Citus: the catalog lookups the other parts start from."""

from __future__ import annotations

from sqlalchemy import Connection


def is_citus(conn: Connection) -> bool:
    """True when the ``citus`` extension is installed in this database (one catalog lookup)."""
    return bool(
        conn.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')").scalar()
    )


def has_distributed_tables(conn: Connection) -> bool:
    """True when some table of this database is already a Citus table."""
    if conn.exec_driver_sql("SELECT to_regclass('pg_catalog.pg_dist_partition')").scalar() is None:
        return False
    return bool(conn.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition)").scalar())
