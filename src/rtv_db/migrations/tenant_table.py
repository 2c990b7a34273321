"""A new tenant table in one migration step, with every guarantee (issue 17).

A tenant table added by hand that misses one of the project's rules is the hole rtv-db exists to
prevent. :func:`tenant_table_sql` writes the whole step as plain SQL a reviewer can read:

* ``client_id`` first, ``id`` second, primary key ``(client_id, id)``, a foreign key to
  ``clients`` (``ON DELETE CASCADE``), every unique constraint led by ``client_id``;
* a composite ``(client_id, <parent>_id)`` foreign key to each tenant parent, with its index, so
  a row can never point at another tenant's row (foreign-key checks bypass RLS);
* ``ENABLE`` and ``FORCE ROW LEVEL SECURITY`` and the ``tenant_isolation`` policy in the
  project's form (``client_id = (SELECT rtv.current_tenant_id())``, an InitPlan);
* the audit trigger, the grants (DML for the runtime and system roles, nothing for PUBLIC: no
  TRUNCATE, REFERENCES or TRIGGER);
* ``STATISTICS 0`` on every column but ``client_id`` and ``id``, as revision 0006 does for the
  core tables.

On Citus nothing else is written here: ``rtv-db migrate`` distributes every table with a
``client_id`` after the revisions run (co-located with the other tenant tables) and rewrites its
policy to the form Citus accepts (see :mod:`rtv_db.citus`).

Use it from a revision (``rtv-db revision --tenant-table posts`` writes one with the SQL spelled
out)::

    from rtv_db.migrations._sql import run
    from rtv_db.migrations.tenant_table import Parent, drop_tenant_table_sql, tenant_table_sql

    def upgrade() -> None:
        run(tenant_table_sql("posts", ["title text NOT NULL", "body text NOT NULL DEFAULT ''"],
                             parents=[Parent("brand_kits", "brand_kit_id")], unique=[("title",)]))

    def downgrade() -> None:
        run(drop_tenant_table_sql("posts"))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError

__all__ = ["Parent", "tenant_table_sql", "drop_tenant_table_sql", "write_tenant_table_revision"]

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
# Columns every tenant table gets; a column definition may not redefine them.
_RESERVED = {"client_id", "id", "created_at", "updated_at"}
# What a column definition may not contain: a second statement, a comment, a quote that could
# hide one. Column definitions are the migration author's text, not user input; this catches typos
# and pasted DDL, it is not a sandbox.
_FORBIDDEN = re.compile(r";|--|/\*|\$\$")


@dataclass(frozen=True)
class Parent:
    """A tenant table this one refers to: ``column`` holds the parent's ``id``."""

    table: str
    column: str
    on_delete: str = "CASCADE"  # CASCADE, RESTRICT or NO ACTION (SET NULL would null client_id too)
    nullable: bool = False


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidInputError(f"{what} {str(value)[:60]!r} must be a lower-case identifier of at most 48 characters")
    return value


def _column_name(definition: str) -> str:
    if not isinstance(definition, str) or _FORBIDDEN.search(definition):
        raise InvalidInputError(f"column definition {str(definition)[:60]!r}: one column, no ';', comments or $$")
    return _name(definition.split(None, 1)[0] if definition.strip() else "", "column")


def tenant_table_sql(
    name: str,
    columns: Sequence[str],
    *,
    parents: Sequence[Parent] = (),
    unique: Sequence[Sequence[str]] = (),
    indexes: Sequence[Sequence[str]] = (),
    audit: bool = True,
) -> str:
    """The SQL that creates tenant table ``name`` (roles as ``@runtime@`` etc., for ``_sql.run``).

    ``columns`` are column definitions (``"title text NOT NULL"``), besides ``client_id``, ``id``,
    ``created_at`` and ``updated_at``, which every tenant table gets. ``parents`` adds each
    parent's column (``uuid``) unless ``columns`` defines it. ``unique`` and ``indexes`` name
    columns; ``client_id`` is put first in each.
    """
    table = _name(name, "table")
    if table in ("clients", "audit_events"):
        raise InvalidInputError(f"{table!r} is rtv-db's own table")
    defined = [_column_name(c) for c in columns]
    clash = sorted(set(defined) & _RESERVED)
    if clash:
        raise InvalidInputError(f"every tenant table has {', '.join(clash)} already: leave them out")
    if len(set(defined)) != len(defined):
        raise InvalidInputError("a column is defined twice")

    lines = ["client_id  uuid        NOT NULL", "id         uuid        NOT NULL DEFAULT gen_random_uuid()"]
    lines += [c.strip() for c in columns]
    for parent in parents:
        _name(parent.table, "parent table")
        _name(parent.column, "parent column")
        if parent.on_delete not in ("CASCADE", "RESTRICT", "NO ACTION"):
            raise InvalidInputError("on_delete must be CASCADE, RESTRICT or NO ACTION")
        if parent.column not in defined:
            lines.append(f"{parent.column} uuid{'' if parent.nullable else ' NOT NULL'}")
    known = set(defined) | {p.column for p in parents} | _RESERVED
    lines += ["created_at timestamptz NOT NULL DEFAULT now()", "updated_at timestamptz NOT NULL DEFAULT now()"]
    lines.append(f"CONSTRAINT {table}_pkey PRIMARY KEY (client_id, id)")
    lines.append(f"CONSTRAINT {table}_client_id_fkey FOREIGN KEY (client_id)\n        REFERENCES clients (id) ON DELETE CASCADE")
    for parent in parents:
        lines.append(
            f"-- Composite: a row can only point at a {parent.table} row of its own tenant.\n"
            f"    CONSTRAINT {table}_{parent.column.removesuffix('_id')}_fkey FOREIGN KEY (client_id, {parent.column})\n"
            f"        REFERENCES {parent.table} (client_id, id) ON DELETE {parent.on_delete}"
        )
    for cols in unique:
        names = _led_by_client_id(cols, known, "unique")
        lines.append(f"CONSTRAINT {table}_{'_'.join(names)}_key UNIQUE ({', '.join(names)})")

    # A comment line goes after the comma that ends the definition before it.
    statements = [f"CREATE TABLE {table} (\n    " + ",\n    ".join(lines) + "\n);"]
    index_sets = [["client_id", p.column] for p in parents] + [_led_by_client_id(c, known, "index") for c in indexes]
    for names in index_sets:
        statements.append(f"CREATE INDEX {table}_{'_'.join(names)}_idx ON {table} ({', '.join(names)});")
    # No planner statistics on tenant content (revision 0006, docs/statistics.md): estimates
    # computed over every tenant's rows would tell a tenant about the others' values.
    content = [*defined, *(p.column for p in parents if p.column not in defined), "created_at", "updated_at"]
    statements.append("\n".join(f"ALTER TABLE {table} ALTER COLUMN {c} SET STATISTICS 0;" for c in content))
    statements.append(f"""ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {table} FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON {table}
    USING (client_id = (SELECT rtv.current_tenant_id()))
    WITH CHECK (client_id = (SELECT rtv.current_tenant_id()));""")
    if audit:
        statements.append(f"""CREATE TRIGGER audit_row_change
    AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION rtv.audit_row_change('client_id');""")
    statements.append(f"""REVOKE ALL ON {table} FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO @runtime@, @system@;""")
    return "\n\n".join(statements) + "\n"


def drop_tenant_table_sql(name: str) -> str:
    """The SQL that removes tenant table ``name`` (its policy, trigger and grants go with it)."""
    return f"DROP TABLE {_name(name, 'table')};\n"


def _led_by_client_id(columns: Sequence[str], known: set[str], what: str) -> list[str]:
    names = [_name(c, f"{what} column") for c in columns if c != "client_id"]
    if not names:
        raise InvalidInputError(f"a {what} needs at least one column besides client_id")
    unknown = sorted(set(names) - known)
    if unknown:
        raise InvalidInputError(f"{what} names columns the table does not have: {', '.join(unknown)}")
    return ["client_id", *names]


_REVISION_TEMPLATE = '''"""Tenant table {table}: written by `rtv-db revision --tenant-table {table}`.

Every rule of a tenant table, spelled out (rtv_db.migrations.tenant_table): the key and foreign
keys led by client_id, ENABLE + FORCE row-level security, the tenant_isolation policy, the
audit trigger and the grants. On Citus, `rtv-db migrate` distributes it after this revision,
also on a database that is distributed already.

Revision ID: {revision}
Revises: {down_revision}
Create Date: {date}
"""

from rtv_db.migrations._sql import run

revision = "{revision}"
down_revision = {down_literal}
branch_labels = None
depends_on = None
# It only creates a new table: `rtv-db migrate` may apply it to a distributed Citus database too.
citus_new_tables_only = True


def upgrade() -> None:
    run(r"""
{sql}""")


def downgrade() -> None:
    run(r"""
{drop}""")
'''


def write_tenant_table_revision(
    directory: Path,
    name: str,
    columns: Sequence[str],
    *,
    parents: Sequence[Parent] = (),
    unique: Sequence[Sequence[str]] = (),
    indexes: Sequence[Sequence[str]] = (),
) -> Path:
    """Write ``NNNN_<name>.py`` into ``directory`` (an Alembic versions folder), after its head.

    The revision id is the next four-digit number; the SQL is :func:`tenant_table_sql`'s, written
    out in the file so that a reviewer reads every statement. Refuses a table that has a
    revision in ``directory`` already.
    """
    import datetime

    sql = tenant_table_sql(name, columns, parents=parents, unique=unique, indexes=indexes)
    folder = Path(directory)
    numbers = sorted(int(m.group(1)) for p in folder.glob("*.py") if (m := re.match(r"^(\d{4})_", p.name)))
    head = f"{numbers[-1]:04d}" if numbers else None
    revision = f"{(numbers[-1] if numbers else 0) + 1:04d}"
    existing = sorted(folder.glob(f"[0-9][0-9][0-9][0-9]_{name}.py"))
    if existing:
        raise InvalidInputError(f"{existing[0]} adds {name} already: edit that revision, or choose another name")
    path = folder / f"{revision}_{name}.py"
    indented = "".join(f"    {line}\n" if line else "\n" for line in sql.splitlines())
    path.write_text(_REVISION_TEMPLATE.format(
        table=name, revision=revision, down_revision=head or "", down_literal=f'"{head}"' if head else "None",
        date=datetime.date.today().isoformat(), sql=indented, drop=f"    {drop_tenant_table_sql(name)}",
    ))
    return path
