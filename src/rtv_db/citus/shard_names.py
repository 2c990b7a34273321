"""Shard names out of error messages: ``brand_kits_102033`` reads ``brand_kits`` again.

* :func:`unshard_message` and :func:`install_error_mapping` turn shard names in error
  messages (``brand_kits_102033``) back into table names, so callers never see them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event

from ..errors import CitusUnsupportedStatementError

# One logger for the package, named as the module was before the split: log output is unchanged.
_log = logging.getLogger("rtv_db.citus")

# A quoted identifier ending in _<shard id>: "brand_kits_102033", "brand_kits_pkey_102033".
_SHARD_NAME = re.compile(r'"([A-Za-z_][A-Za-z0-9_$]*?)_(\d+)"')
# Shard ids start at 102008 by default; a long-enough suffix tells a shard from a name like t_2.
_GENERIC_MIN_DIGITS = 6
_WORKER_CONTEXT = re.compile(r"\n?CONTEXT:\s+while executing command on [^\n]*")


def unshard_message(message: str, known_names: Iterable[str] | None = None, *, generic: bool | None = None) -> str:
    """``message`` with shard names replaced by the logical names and worker addresses removed.

    A quoted name ``"<name>_<digits>"`` becomes ``"<name>"`` when ``<name>`` is one of
    ``known_names`` (tables, constraints, indexes) and ``<name>_<digits>`` itself is not. With
    ``generic`` (the default when no names are given), an unknown ``<name>`` is mapped too when
    the suffix has at least six digits, as Citus shard ids do.
    """
    known = frozenset(known_names or ())
    generic = not known if generic is None else generic

    def replace(match: re.Match[str]) -> str:
        base, digits = match.group(1), match.group(2)
        if f"{base}_{digits}" in known:  # a real name that happens to end in digits
            return match.group(0)
        if base in known or (generic and len(digits) >= _GENERIC_MIN_DIGITS):
            return f'"{base}"'
        return match.group(0)

    return _WORKER_CONTEXT.sub("", _SHARD_NAME.sub(replace, message))


_KNOWN_NAMES_SQL = """
SELECT c.relname FROM pg_catalog.pg_dist_partition p JOIN pg_catalog.pg_class c ON c.oid = p.logicalrelid
UNION SELECT con.conname FROM pg_catalog.pg_constraint con
      JOIN pg_catalog.pg_dist_partition p ON p.logicalrelid = con.conrelid
UNION SELECT i.relname FROM pg_catalog.pg_index x
      JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid
      JOIN pg_catalog.pg_dist_partition p ON p.logicalrelid = x.indrelid
"""


def _static_names() -> set[str]:
    """Table, constraint and index names of the models: known even before any catalog lookup."""
    from ..schema import metadata

    names: set[str] = set()
    for table in metadata.tables.values():
        names.add(table.name)
        names.update(str(c.name) for c in table.constraints if c.name)
        names.update(str(i.name) for i in table.indexes if i.name)
    return names


@dataclass
class _MappingState:
    detected: bool = False
    citus: bool = False
    names: set[str] = field(default_factory=set)


def _detect(dbapi_connection: Any, state: _MappingState) -> None:
    # The pool's DBAPI connection: psycopg's, or SQLAlchemy's sync adapter of the async one.
    cur = dbapi_connection.cursor()
    try:
        cur.execute("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')")
        state.citus = bool(cur.fetchone()[0])
        if state.citus:
            try:
                cur.execute(_KNOWN_NAMES_SQL)
                state.names.update(r[0] for r in cur.fetchall())
            except Exception:  # not readable by this role: the static names and the generic rule remain
                _log.debug("citus: shard-name lookup unavailable", exc_info=True)
    finally:
        cur.close()
    dbapi_connection.rollback()
    state.detected = True


def install_error_mapping(engine: Engine, *, known_names: Iterable[str] | None = None, force: bool = False) -> None:
    """Rewrite shard names out of the errors ``engine`` raises, when the server is Citus.

    Detection runs once per engine, on its first connection (one catalog query). ``force``
    (with ``known_names``) turns the mapping on without detection, for tests.
    """
    state = _MappingState(detected=force, citus=force, names=set(known_names or ()))
    state.names |= _static_names()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if not state.detected:
            _detect(dbapi_connection, state)

    @event.listens_for(engine, "handle_error")
    def _unshard(context: Any) -> BaseException | None:
        if not state.citus:
            return None
        for exc in (context.original_exception, context.sqlalchemy_exception):
            if exc is None or len(getattr(exc, "args", ())) != 1 or not isinstance(exc.args[0], str):
                continue
            exc.args = (unshard_message(exc.args[0], state.names, generic=True),)
        if _RLS_COPY in str(context.original_exception):
            # INSERT ... SELECT pulled to the coordinator and sent to the shards as COPY.
            typed = CitusUnsupportedStatementError(
                "Citus runs this INSERT ... SELECT into a distributed table as COPY to the shards, and PostgreSQL"
                " refuses COPY FROM into a table with row-level security; nothing was written. Use INSERT ..."
                " VALUES with the rows (scoped_insert does), or select the rows first and insert them.")
            typed.__cause__ = context.sqlalchemy_exception or context.original_exception
            return typed
        return None


_RLS_COPY = "COPY FROM not supported with row-level security"
