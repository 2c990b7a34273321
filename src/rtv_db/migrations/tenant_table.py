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
* ``STATISTICS 0`` on every column, ``client_id`` and ``id`` included, as revisions 0006 and 0009
  do for the core tables (docs/statistics.md).

Each column definition is parsed, not pasted: ``<name> <type> [NOT NULL | NULL] [DEFAULT
<constant>]``, the type from a fixed list (:data:`COLUMN_TYPES`), the default a constant (a quoted
string, optionally cast to such a type, a number, ``true``/``false``/``NULL``, ``now()``,
``CURRENT_TIMESTAMP``, ``CURRENT_DATE``, ``gen_random_uuid()``). Anything else (a second column
after a comma, a constraint, a comment, a quoted identifier) is an :class:`InvalidInputError`
and nothing is written; the SQL is rendered from what was parsed. Constraints beyond NOT NULL
(CHECK, REFERENCES to a non-tenant table) go in the revision as separate statements.

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

__all__ = ["COLUMN_TYPES", "ColumnDefinition", "Parent", "parse_column", "tenant_table_sql", "drop_tenant_table_sql",
           "write_tenant_table_revision"]

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
# Columns every tenant table gets; a column definition may not redefine them.
_RESERVED = {"client_id", "id", "created_at", "updated_at"}

COLUMN_TYPES: dict[str, int] = {
    # type name (as written, lower case) -> how many modifiers it takes in parentheses (at most)
    "text": 0, "varchar": 1, "character varying": 1, "char": 1, "character": 1,
    "smallint": 0, "integer": 0, "int": 0, "bigint": 0, "numeric": 2, "decimal": 2, "real": 0,
    "double precision": 0, "boolean": 0, "bool": 0,
    "date": 0, "time": 1, "timestamp": 1, "timestamptz": 1, "timestamp with time zone": 0,
    "timestamp without time zone": 0, "interval": 0,
    "uuid": 0, "jsonb": 0, "json": 0, "bytea": 0, "inet": 0, "vector": 1,
}
"""The column types a generated tenant table may use (each also as an array, ``text[]``)."""

_MULTI_WORD_TYPES = sorted((t for t in COLUMN_TYPES if " " in t), key=len, reverse=True)
_DEFAULT_CALLS = {"now", "gen_random_uuid"}
_DEFAULT_KEYWORDS = {"true": "true", "false": "false", "null": "NULL", "current_timestamp": "CURRENT_TIMESTAMP",
                     "current_date": "CURRENT_DATE"}
# One token: a word, a number, a quoted string ('' inside), or one of ( ) , [ ] ::. Anything else
# (";", a comment, a double quote, "$", a backslash) matches nothing and is refused. A string may
# hold no backslash, control character or two double quotes in a row either: it is written into
# the revision's r"""...""" Python string, one line per statement line.
_TOKEN = re.compile(r"\s*(?:(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>-?[0-9]+(?:\.[0-9]+)?)"
                    r"|(?P<string>'(?:[^'\\\"\x00-\x1f\x7f]|''|\"(?!\"))*')|(?P<punct>::|[(),\[\]]))")
_GRAMMAR = "<name> <type> [NOT NULL | NULL] [DEFAULT <constant>]"


@dataclass(frozen=True)
class ColumnDefinition:
    """One parsed column definition; :meth:`sql` renders it."""

    name: str
    type: str
    not_null: bool = False
    default: str | None = None

    def sql(self) -> str:
        return " ".join([self.name, self.type, *(["NOT NULL"] if self.not_null else []),
                         *([f"DEFAULT {self.default}"] if self.default is not None else [])])


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


def _tokens(definition: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    text = definition.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise _bad(definition, f"unexpected {text[position:].strip()[:20]!r}")
        tokens.append(match.group(match.lastgroup or "word"))
        position = match.end()
    return tokens


def _bad(definition: object, why: str) -> InvalidInputError:
    return InvalidInputError(f"column definition {str(definition)[:60]!r}: expected one column, {_GRAMMAR}: {why}")


class _Reader:
    """The tokens of one definition, read front to back."""

    def __init__(self, definition: str) -> None:
        self.definition = definition
        self.tokens = _tokens(definition)
        self.at = 0

    def peek(self, offset: int = 0) -> str | None:
        i = self.at + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def word(self, offset: int = 0) -> str | None:
        token = self.peek(offset)
        return token.lower() if token is not None and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token) else None

    def take(self, count: int = 1) -> list[str]:
        taken = self.tokens[self.at:self.at + count]
        self.at += count
        return taken

    def expect(self, token: str) -> None:
        if self.peek() != token:
            raise _bad(self.definition, f"expected {token!r}, found {self.peek()!r}")
        self.at += 1

    def bad(self, why: str) -> InvalidInputError:
        return _bad(self.definition, why)


def _type(reader: _Reader) -> str:
    """A type of :data:`COLUMN_TYPES`, with its modifiers and an optional ``[]``, normalised."""
    name = None
    for candidate in _MULTI_WORD_TYPES:
        words = candidate.split()
        if [reader.word(i) for i in range(len(words))] == words:
            name = candidate
            reader.take(len(words))
            break
    if name is None:
        word = reader.word()
        if word not in COLUMN_TYPES:
            raise reader.bad(f"type {reader.peek()!r} is not one of {', '.join(sorted(COLUMN_TYPES))}")
        name = word
        reader.take()
    modifiers: list[str] = []
    if reader.peek() == "(":
        reader.take()
        while True:
            token = reader.peek()
            if token is None or not token.isdigit():
                raise reader.bad(f"a type modifier must be a whole number, not {token!r}")
            modifiers.append(str(int(token)))
            reader.take()
            if reader.peek() == ",":
                reader.take()
                continue
            reader.expect(")")
            break
    if len(modifiers) > COLUMN_TYPES[name]:
        raise reader.bad(f"{name} takes at most {COLUMN_TYPES[name]} modifier(s)")
    rendered = name + (f"({', '.join(modifiers)})" if modifiers else "")
    if reader.peek() == "[":
        reader.take()
        reader.expect("]")
        rendered += "[]"
    return rendered


def _default(reader: _Reader) -> str:
    """A constant: a string (optionally ``::type``), a number, true/false/NULL, now(), ..."""
    token = reader.peek()
    word = reader.word()
    if token is None:
        raise reader.bad("DEFAULT needs a value")
    if token.startswith("'"):
        reader.take()
        value = token
        if reader.peek() == "::":
            reader.take()
            value += "::" + _type(reader)
        return value
    if re.fullmatch(r"-?[0-9]+(?:\.[0-9]+)?", token):
        reader.take()
        return token
    if word in _DEFAULT_KEYWORDS:
        reader.take()
        return _DEFAULT_KEYWORDS[word]
    if word in _DEFAULT_CALLS and reader.peek(1) == "(" and reader.peek(2) == ")":
        reader.take(3)
        return f"{word}()"
    raise reader.bad(f"DEFAULT {token!r} is not a constant (a quoted string, a number, true, false, NULL, "
                     "now(), CURRENT_TIMESTAMP, CURRENT_DATE, gen_random_uuid())")


def parse_column(definition: str) -> ColumnDefinition:
    """``definition`` (``"title text NOT NULL DEFAULT ''"``) as a :class:`ColumnDefinition`, or
    :class:`InvalidInputError` for anything but one column of the grammar."""
    if not isinstance(definition, str) or not definition.strip():
        raise _bad(definition, "empty")
    reader = _Reader(definition)
    name = reader.peek() or ""
    if not _NAME.match(name):
        raise reader.bad(f"column {name[:60]!r} must be a lower-case identifier of at most 48 characters")
    reader.take()
    column_type = _type(reader)
    not_null: bool | None = None
    default: str | None = None
    while reader.peek() is not None:
        word = reader.word()
        if word == "not" and reader.word(1) == "null" and not_null is None:
            reader.take(2)
            not_null = True
        elif word == "null" and not_null is None:
            reader.take()
            not_null = False
        elif word == "default" and default is None:
            reader.take()
            default = _default(reader)
        else:
            raise reader.bad(f"unexpected {reader.peek()!r} (one column; NOT NULL, NULL and DEFAULT once each)")
    return ColumnDefinition(name, column_type, bool(not_null), default)


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
    if isinstance(columns, str):
        raise InvalidInputError("columns is a list of column definitions, not one string")
    parsed = [parse_column(c) for c in columns]
    defined = [c.name for c in parsed]
    clash = sorted(set(defined) & _RESERVED)
    if clash:
        raise InvalidInputError(f"every tenant table has {', '.join(clash)} already: leave them out")
    if len(set(defined)) != len(defined):
        raise InvalidInputError("a column is defined twice")

    lines = ["client_id  uuid        NOT NULL", "id         uuid        NOT NULL DEFAULT gen_random_uuid()"]
    lines += [c.sql() for c in parsed]
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
    # No planner statistics on any column (revisions 0006 and 0009, docs/statistics.md): estimates
    # computed over every tenant's rows would tell a tenant about the others' values, and those on
    # client_id about which tenants exist.
    content = ["client_id", "id", *defined, *(p.column for p in parents if p.column not in defined),
               "created_at", "updated_at"]
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
