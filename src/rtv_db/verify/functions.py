"""rtv-db's own functions, compared with what its migrations install (issue 24, item 7).

The isolation rests on a handful of functions in ``rtv`` and ``rtv_secret``: the token check, the
verified context, the readers the policies call, the clean session, the search-key and audit
triggers. Each can be replaced by its owner (or a superuser) with something that looks the same
from outside: a ``verify_token()`` that skips its MAC check, a ``verified_context()`` that trusts a
plain setting, a ``clean_session()`` that does nothing, an ``assign_search_key()`` that lets the
writer choose the key. Checks that look for one known mistake each miss the next one.

So verify compares every function in those schemas, attribute by attribute and body by body,
with a manifest of what rtv-db's migrations install (``functions.json`` beside this module,
written from a freshly migrated database by ``tests/test_function_manifest.py``). The role names
in bodies and owners are compared as ``@owner@``, ``@runtime@``, ``@system@``, so a deployment
with its own role names matches. On Citus, the functions the distribution rewrites
(:mod:`rtv_db.citus.apply`, and the plain context readers of unsigned mode,
:mod:`rtv_db.citus.context`) are compared in their Citus form.

Findings: ``FUNCTION_ALTERED`` (a definition differs), ``FUNCTION_MISSING`` (one of rtv-db's
functions is gone), ``FUNCTION_UNEXPECTED`` (a function in rtv-db's schemas that its migrations
never create: a look-alike overload, or a helper someone added there).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

from psycopg import Connection

from ._model import Finding, VerifyConfig, register_check

__all__ = ["check_function_definitions", "function_definitions", "load_manifest", "MANIFEST_FILE"]

MANIFEST_FILE = "functions.json"
# The schemas whose every function is rtv-db's own.
SCHEMAS = ("rtv", "rtv_secret")

_DEFINITIONS = """
SELECT p.oid::pg_catalog.regprocedure::text,
       l.lanname, p.prosecdef, p.provolatile, p.proisstrict, p.proleakproof, p.proparallel,
       COALESCE(p.proconfig, '{}'), pg_catalog.pg_get_function_result(p.oid),
       pg_catalog.pg_get_userbyid(p.proowner), p.prosrc
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE n.nspname = ANY(%s)
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d  -- members of an extension are the extension's
                  WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY 1
"""

_ATTRIBUTES = ("language", "security_definer", "volatility", "strict", "leakproof", "parallel", "config",
               "returns", "owner", "source")


def _roles(config: VerifyConfig) -> dict[str, str]:
    return {"@owner@": config.owner_role, "@runtime@": config.runtime_role, "@system@": config.system_role}


def _normalised(text: str, roles: dict[str, str]) -> str:
    """Role names as the revisions write them (quoted identifiers first, then bare names)."""
    for placeholder, name in roles.items():
        text = text.replace(f'"{name}"', placeholder)
    for placeholder, name in roles.items():
        if name == text:
            return placeholder
    return text


def function_definitions(conn: Connection, config: VerifyConfig) -> dict[str, dict[str, Any]]:
    """Every function of rtv-db's schemas, as the manifest records it (role names as placeholders)."""
    roles = _roles(config)
    found: dict[str, dict[str, Any]] = {}
    with conn.transaction():
        # Type names in signatures are qualified unless visible: render them for one fixed path,
        # whatever search_path the connection (or a planted role setting) has.
        conn.execute("SET LOCAL search_path = pg_catalog, public")
        rows = conn.execute(_DEFINITIONS, (list(SCHEMAS),)).fetchall()
    for (signature, language, secdef, volatility, strict, leakproof, parallel, proconfig, returns, owner,
         source) in rows:
        found[signature] = {
            "language": language,
            "security_definer": secdef,
            "volatility": volatility,
            "strict": strict,
            "leakproof": leakproof,
            "parallel": parallel,
            "config": list(proconfig),
            "returns": returns,
            "owner": _normalised(owner, roles),
            "source": _normalised(source, roles),
        }
    return found


@functools.lru_cache(maxsize=1)
def load_manifest() -> dict[str, Any]:
    """The manifest shipped with this version of rtv-db: ``{"revision": ..., "functions": {...}}``."""
    text = resources.files(__package__).joinpath(MANIFEST_FILE).read_text(encoding="utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


def _citus_forms(expected: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The two functions as :mod:`rtv_db.citus.apply` rewrites them on a coordinator."""
    from ..citus.apply import _AUDIT_INSERT, _CITUS_TO_UUID
    from ..citus.context import PLAIN_CONTEXT_READERS
    from ..citus.plan import AUDIT_REFERENCE_GUARD, AUDIT_TRIGGER_FUNCTION

    forms: dict[str, dict[str, Any]] = {}
    audit = expected.get(f"{AUDIT_TRIGGER_FUNCTION}()")
    if audit is not None:
        forms[f"{AUDIT_TRIGGER_FUNCTION}()"] = {
            **audit, "source": audit["source"].replace(_AUDIT_INSERT, AUDIT_REFERENCE_GUARD + _AUDIT_INSERT)}
    # Unsigned mode on Citus: the readers the policies call become revision 0002's plain ones.
    for signature, statement in PLAIN_CONTEXT_READERS.items():
        if signature in expected:
            forms[signature] = {**expected[signature], "language": "sql", "security_definer": False,
                                "volatility": "s", "parallel": "s", "config": [],
                                "source": statement.split("$$")[1]}
    to_uuid = expected.get("rtv.to_uuid_or_null(text)")
    if to_uuid is not None:
        body = _CITUS_TO_UUID.split("$$")[1]
        forms["rtv.to_uuid_or_null(text)"] = {**to_uuid, "language": "plpgsql", "source": body}
    return forms


def _difference(live: dict[str, Any], expected: dict[str, Any]) -> str:
    changed = [a for a in _ATTRIBUTES if live.get(a) != expected.get(a)]
    parts = []
    for attribute in changed:
        if attribute == "source":
            live_lines, expected_lines = live["source"].splitlines(), expected["source"].splitlines()
            line = next((i for i, (x, y) in enumerate(zip(live_lines, expected_lines)) if x.strip() != y.strip()),
                        min(len(live_lines), len(expected_lines)))
            shown = live_lines[line].strip() if line < len(live_lines) else "(ends here)"
            parts.append(f"body differs from line {line + 1}: {shown[:80]!r}")
        else:
            parts.append(f"{attribute} is {live.get(attribute)!r}, rtv-db installs {expected.get(attribute)!r}")
    return "; ".join(parts)


@register_check
def check_function_definitions(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Every function in ``rtv`` and ``rtv_secret`` is exactly what rtv-db's migrations install."""
    if not conn.execute("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'rtv'").fetchone():
        return  # not migrated: other checks say so
    manifest = load_manifest()
    expected: dict[str, dict[str, Any]] = manifest["functions"]
    on_citus = conn.execute("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus'").fetchone() is not None
    citus = _citus_forms(expected) if on_citus else {}
    live = function_definitions(conn, config)
    behind = "; if the database is not at rtv-db's head revision, run `rtv-db migrate` first"
    for signature, definition in live.items():
        wanted = expected.get(signature)
        if wanted is None:
            yield Finding(
                "FUNCTION_UNEXPECTED", "error", f"function {signature}",
                f"{signature} is in rtv-db's own schemas but rtv-db's migrations (revision {manifest['revision']}) "
                "never create it",
                "The policies, the audit trigger and the context setter call functions in these schemas by name; "
                "a look-alike overload or an added helper there runs with whatever its author gave it, and "
                "nothing reviews it.",
                f"DROP FUNCTION {signature}; (or move it to a schema of the application's own){behind}",
            )
        elif definition != wanted and definition != citus.get(signature):
            yield Finding(
                "FUNCTION_ALTERED", "error", f"function {signature}",
                f"{signature} is not the function rtv-db installs: {_difference(definition, wanted)}",
                "Tenant isolation rests on these bodies: a token check without its MAC, a context that trusts "
                "a plain setting, a clean session that does nothing or a search-key trigger that lets the "
                "writer choose would each open one tenant's rows to another while every policy looks right.",
                f"Run `rtv-db migrate` to put rtv-db's definitions back after finding out who changed it "
                f"(pg_get_functiondef('{signature}'::regprocedure) shows what is there now){behind}",
            )
    for signature in sorted(set(expected) - set(live)):
        yield Finding(
            "FUNCTION_MISSING", "error", f"function {signature}",
            f"{signature}, one of rtv-db's functions (revision {manifest['revision']}), is missing",
            "The policies, triggers and the context setter call it; without it tenant transactions fail, or "
            "a replacement with another signature is called instead.",
            f"Run `rtv-db migrate`{behind}",
        )
