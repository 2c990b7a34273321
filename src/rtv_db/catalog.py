"""Reading what exists in a database: tables and their RLS state, roles and their attributes."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

__all__ = ["TableInfo", "RoleInfo", "list_tables", "list_roles"]


@dataclass(frozen=True)
class TableInfo:
    name: str
    owner: str
    rls_enabled: bool
    rls_forced: bool
    policies: int
    has_client_id: bool
    rows_estimate: int


@dataclass(frozen=True)
class RoleInfo:
    name: str
    login: bool
    superuser: bool
    bypassrls: bool
    createrole: bool
    createdb: bool
    owns: int


_TABLES = text(
    """
    SELECT c.relname, pg_get_userbyid(c.relowner), c.relrowsecurity, c.relforcerowsecurity,
           (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid),
           EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'client_id'
                   AND NOT a.attisdropped),
           greatest(c.reltuples, 0)::bigint
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = :schema AND c.relkind IN ('r', 'p')
    ORDER BY c.relname
    """
)

_ROLES = text(
    """
    SELECT r.rolname, r.rolcanlogin, r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb,
           (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid
              AND c.relnamespace = ANY (SELECT oid FROM pg_namespace WHERE nspname IN ('public', 'rtv')))
    FROM pg_roles r WHERE r.rolname = ANY(:names) ORDER BY r.rolname
    """
)


def list_tables(conn: Connection, schema: str = "public") -> list[TableInfo]:
    return [TableInfo(*row) for row in conn.execute(_TABLES, {"schema": schema})]


def list_roles(conn: Connection, names: list[str]) -> list[RoleInfo]:
    return [RoleInfo(*row) for row in conn.execute(_ROLES, {"names": names})]
