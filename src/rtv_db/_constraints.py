"""Constraint errors from PostgreSQL as rtv-db's typed errors, without the key values.

PostgreSQL's message for a unique or foreign-key violation carries a DETAIL line with the key
*values* (``Key (client_id, name)=(..., Main) already exists``). rtv-db's error says which table,
constraint and columns, from the error's fields and the schema, and never copies the message.
One ``handle_error`` listener per engine covers the scoped API, raw SQL on a scope's connection
and ORM sessions (flush and commit), sync and async.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from sqlalchemy import Engine, ForeignKeyConstraint, UniqueConstraint, PrimaryKeyConstraint, event

from .errors import ConstraintViolationError, DuplicateError, ReferenceNotFoundError, StillReferencedError

__all__ = ["translate_constraint_error", "install_constraint_errors"]

_UNIQUE = "23505"
_FOREIGN_KEY = "23503"


@functools.cache
def _constraints() -> dict[str, tuple[str, tuple[str, ...], str | None]]:
    """constraint name -> (table, column names, referenced table) from rtv-db's schema."""
    from .schema.models import metadata

    found: dict[str, tuple[str, tuple[str, ...], str | None]] = {}
    for table in metadata.tables.values():
        for constraint in table.constraints:
            if not isinstance(constraint.name, str):
                continue
            if isinstance(constraint, ForeignKeyConstraint):
                found[constraint.name] = (table.name, tuple(constraint.column_keys), constraint.referred_table.name)
            elif isinstance(constraint, (UniqueConstraint, PrimaryKeyConstraint)):
                found[constraint.name] = (table.name, tuple(c.name for c in constraint.columns), None)
        for index in table.indexes:  # a unique index reports its name too (clients_slug_key: an expression on slug)
            if index.unique and isinstance(index.name, str):
                found[index.name] = (table.name, tuple(c.name for c in index.columns), None)
    return found


_CONSTRAINT_IN_MESSAGE = re.compile(r'constraint "([A-Za-z_][A-Za-z0-9_$]*)"')


def translate_constraint_error(orig: BaseException, statement: str | None = None) -> ConstraintViolationError | None:
    """The typed error for a driver error ``orig``, or None when it is no unique/foreign-key violation."""
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate not in (_UNIQUE, _FOREIGN_KEY):
        return None
    diag = getattr(orig, "diag", None)
    constraint = getattr(diag, "constraint_name", None)
    table = getattr(diag, "table_name", None)
    if constraint is None:
        # A Citus coordinator relays a worker's error by its text only (no diag fields), naming
        # the shard's constraint: "brand_kits_client_id_name_key_102041".
        match = _CONSTRAINT_IN_MESSAGE.search(str(getattr(diag, "message_primary", "") or orig))
        if match is not None:
            from .citus import unshard_message

            constraint = unshard_message(f'"{match.group(1)}"', _constraints().keys(), generic=True).strip('"')
    known = _constraints().get(constraint or "")
    columns: tuple[str, ...] = ()
    referenced: str | None = None
    if known is not None:
        table, columns, referenced = known
    named = f' (constraint "{constraint}")' if constraint else ""
    where = table or "the table"
    cols = f"({', '.join(c for c in columns if c != 'client_id') or ', '.join(columns)})" if columns else "key"
    error: ConstraintViolationError
    if sqlstate == _UNIQUE:
        message = f"duplicate {where}: this tenant already has a row with the same {cols}{named}"
        error = DuplicateError(message, table=table, constraint=constraint, columns=columns, statement=statement,
                               orig=orig)
    elif str(getattr(diag, "message_primary", "") or "").startswith("update or delete on table"):
        message = f"{referenced or 'the row'} is still referenced from {where}{named}"
        error = StillReferencedError(message, table=table, constraint=constraint, columns=columns,
                                     statement=statement, orig=orig)
    else:
        message = f"{where}: the referenced {referenced or 'row'} does not exist{named}"
        error = ReferenceNotFoundError(message, table=table, constraint=constraint, columns=columns,
                                       statement=statement, orig=orig)
    return error


def install_constraint_errors(engine: Engine) -> None:
    """Raise :class:`DuplicateError` / :class:`ReferenceNotFoundError` instead of the raw IntegrityError."""

    @event.listens_for(engine, "handle_error")
    def _typed(context: Any) -> BaseException | None:
        if getattr(context, "chained_exception", None) is not None:
            return None  # an earlier listener (Citus) already chose the error
        typed = translate_constraint_error(context.original_exception, context.statement)
        if typed is None:
            return None
        typed.__cause__ = context.original_exception
        return typed
