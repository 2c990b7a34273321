"""Checks of the runtime role: what it may do to tables and schemas, its own settings, and what
its sessions may do to each other (signals, advisory locks, large objects, query text).
"""

from __future__ import annotations

from collections.abc import Iterator

from psycopg import Connection

from ._model import _USER_SCHEMA, Finding, VerifyConfig, _scalar, register_check


@register_check
def check_runtime_role_privileges(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The runtime role must be bound by RLS: no superuser, no BYPASSRLS, no ownership, no DDL."""
    role = config.runtime_role
    row = conn.execute(
        "SELECT oid, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", (role,)
    ).fetchone()
    if row is None:
        yield Finding(
            "ROLE_MISSING", "error", f"role {role}",
            f"the runtime role {role} does not exist",
            "Nothing can be verified about the role the application connects as; the application "
            "is probably connecting as another, possibly privileged, role.",
            "Run `rtv-db migrate` (it creates the roles), or pass --runtime-role with the role "
            "in DATABASE_URL.",
        )
        return
    oid, is_super, bypass = row
    if is_super:
        yield Finding(
            "ROLE_SUPERUSER", "error", f"role {role}", f"the runtime role {role} is a superuser",
            "Superusers bypass Row-Level Security entirely, FORCE or not: every tenant sees every row.",
            f"ALTER ROLE {role} NOSUPERUSER;",
        )
    if bypass:
        yield Finding(
            "ROLE_BYPASSRLS", "error", f"role {role}", f"the runtime role {role} has BYPASSRLS",
            "A BYPASSRLS role ignores every policy: isolation is gone for the application.",
            f"ALTER ROLE {role} NOBYPASSRLS; (cross-tenant jobs use the separate system role).",
        )
    for (name,) in conn.execute(
        f"""
        SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relowner = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {_USER_SCHEMA}
        ORDER BY 1
        """,
        (oid,),
    ):
        yield Finding(
            "ROLE_OWNS_TABLE", "error", name, f"the runtime role {role} owns {name}",
            "A table's owner can disable or drop its policies, and without FORCE is not bound by "
            "them; the runtime role must own nothing.",
            f"ALTER TABLE {name} OWNER TO rtv_owner;  (the owner role)",
        )
    for (name,) in conn.execute(
        f"""
        SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND {_USER_SCHEMA} AND c.relowner <> %(oid)s
          AND has_table_privilege(%(oid)s, c.oid, 'TRUNCATE')
        ORDER BY 1
        """,
        {"oid": oid},
    ):
        yield Finding(
            "ROLE_TRUNCATE", "error", name, f"the runtime role {role} may TRUNCATE {name}",
            "TRUNCATE is not subject to Row-Level Security: one tenant's request could empty the "
            "table for every tenant.",
            f"REVOKE TRUNCATE ON {name} FROM {role};  (and from PUBLIC, if granted there)",
        )
    for (schema,) in conn.execute(
        f"""
        SELECT n.nspname FROM pg_namespace n
        WHERE {_USER_SCHEMA} AND has_schema_privilege(%s, n.oid, 'CREATE') ORDER BY 1
        """,
        (oid,),
    ):
        yield Finding(
            "ROLE_CAN_CREATE", "error", f"schema {schema}", f"the runtime role {role} may CREATE in schema {schema}",
            "A role that creates objects owns them: it can create a table or function that shadows "
            "one on the search_path, or a view without RLS, and run code as whoever uses it.",
            f"REVOKE CREATE ON SCHEMA {schema} FROM {role}, PUBLIC;",
        )
    if _scalar(conn, "SELECT has_database_privilege(%s, current_database(), 'TEMPORARY')", (oid,)):
        yield Finding(
            "ROLE_CAN_CREATE_TEMP", "warning", "database", f"the runtime role {role} may create temporary objects",
            "pg_temp is searched first for relations: a temporary table or view can shadow a tenant "
            "table in unqualified SQL, and a pg_temp function can hijack a SECURITY DEFINER "
            "function without a safe search_path.",
            f"REVOKE TEMPORARY ON DATABASE {_scalar(conn, 'SELECT quote_ident(current_database())')} "
            f"FROM PUBLIC, {role};",
        )
    for member_of, why in conn.execute(
        f"""
        SELECT m.rolname,
               concat_ws(', ',
                   CASE WHEN m.rolsuper THEN 'superuser' END,
                   CASE WHEN m.rolbypassrls THEN 'BYPASSRLS' END,
                   CASE WHEN EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                     WHERE c.relowner = m.oid AND c.relkind IN ('r', 'p') AND {_USER_SCHEMA})
                        THEN 'owns tables' END)
        FROM pg_roles m
        WHERE m.oid <> %(oid)s AND pg_has_role(%(oid)s, m.oid, 'MEMBER')
          AND (m.rolsuper OR m.rolbypassrls OR EXISTS (
                SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relowner = m.oid AND c.relkind IN ('r', 'p') AND {_USER_SCHEMA}))
        ORDER BY 1
        """,
        {"oid": oid},
    ):
        yield Finding(
            "ROLE_MEMBER_OF_PRIVILEGED", "error", f"role {role}",
            f"the runtime role {role} is a member of {member_of} ({why})",
            "A member can SET ROLE to it (or inherits its rights): one SQL statement turns the "
            "application into a role that bypasses or owns the policies.",
            f"REVOKE {member_of} FROM {role};",
        )


# -- the runtime role's settings and what its sessions may do to each other ----------------------

_TIMEOUT_KEYS = ("statement_timeout", "idle_in_transaction_session_timeout")
_LOG_KEYS = ("log_parameter_max_length", "log_parameter_max_length_on_error")


@register_check
def check_runtime_role_settings(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The runtime role's settings must be exactly what `rtv-db migrate` installs.

    The role can change its own (ALTER ROLE current_user SET ...), and every connection of every
    tenant inherits them: a planted search_path breaks them all, statement_timeout = 0 unbounds
    them. The application refuses such a role at connect (RuntimeRoleSettingsError).
    """
    from ..config import diff_role_settings, runtime_role_settings_from_env

    role = config.runtime_role
    row = conn.execute(
        """
        SELECT (SELECT s.setconfig FROM pg_db_role_setting s WHERE s.setrole = r.oid AND s.setdatabase = 0),
               (SELECT s.setconfig FROM pg_db_role_setting s WHERE s.setrole = r.oid
                  AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())),
               quote_ident(current_database())
        FROM pg_roles r WHERE r.rolname = %s
        """,
        (role,),
    ).fetchone()
    if row is None:
        return  # ROLE_MISSING
    global_settings, database_settings, database = row
    expected = config.role_settings if config.role_settings is not None else runtime_role_settings_from_env()
    diff = diff_role_settings(global_settings, database_settings, expected)
    unexpected = diff.describe(missing=False)
    if unexpected:
        resets = []
        if diff.for_every_database:
            resets.append(f"ALTER ROLE {role} RESET ALL;")
        if diff.unexpected or diff.wrong:
            resets.append(f"ALTER ROLE {role} IN DATABASE {database} RESET ALL;")
        yield Finding(
            "ROLE_SETTINGS_UNEXPECTED", "error", f"role {role}",
            f"the runtime role {role} has settings rtv-db does not install: {'; '.join(unexpected)}",
            "Every connection of every tenant inherits the role's settings, and the runtime role can "
            "change its own (ALTER ROLE current_user SET ...): a search_path breaks every tenant's "
            "next connection, statement_timeout = 0 lets one tenant's statement run for ever. The "
            "application refuses to connect as a role with such settings.",
            "Run `rtv-db migrate` (it resets every setting of the runtime role and installs its "
            f"own), or {' '.join(resets)} then migrate; and find out who changed them.",
        )
    missing_timeouts = [k for k in _TIMEOUT_KEYS if k in diff.missing]
    if missing_timeouts:
        yield Finding(
            "ROLE_TIMEOUTS_MISSING", "warning", f"role {role}",
            f"the runtime role {role} has no {' and no '.join(missing_timeouts)} in this database",
            "Without them one tenant's slow statement or abandoned open transaction holds a pooled "
            "connection, and its locks, for ever. They are role settings so that they hold behind a "
            "pooler (PgBouncer refuses or drops startup options).",
            "Run `rtv-db migrate` (RTV_DB_STATEMENT_TIMEOUT_MS, RTV_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS; "
            f"30 s and 60 s by default), or ALTER ROLE {role} IN DATABASE {database} SET "
            "statement_timeout = 30000 (and idle_in_transaction_session_timeout = 60000).",
        )
    missing_logs = [k for k in _LOG_KEYS if k in diff.missing]
    if missing_logs:
        yield Finding(
            "ROLE_LOGS_PARAMETERS", "warning", f"role {role}",
            f"{' and '.join(missing_logs)} not set to 0 for the runtime role {role} in this database",
            "The signed tenant-context token travels as a bind parameter: with statement logging, or "
            "in the log line of a failed statement, the server writes bind parameters to its log, "
            "where whoever reads the log sees every tenant's tokens.",
            "Run `rtv-db migrate` as a superuser, or ALTER ROLE "
            f"{role} IN DATABASE {database} SET log_parameter_max_length = 0 (and "
            "log_parameter_max_length_on_error = 0).",
        )
    if "temp_file_limit" in diff.missing:
        yield Finding(
            "ROLE_TEMP_FILES_UNBOUNDED", "warning", f"role {role}",
            f"no temp_file_limit for the runtime role {role} in this database",
            "temp_file_limit is -1 (unbounded) by default: one sort or hash of one tenant's statement, with "
            "work_mem lowered or not, writes as many temporary files as it likes, until the server's disk is full.",
            "Run `rtv-db migrate` as a superuser (RTV_DB_TEMP_FILE_LIMIT_KB, 1 GB by default), or ALTER ROLE "
            f"{role} IN DATABASE {database} SET temp_file_limit = 1048576 (a superuser-only parameter: the runtime "
            "role cannot lift it).",
        )


# What `rtv-db migrate` revokes from PUBLIC in the database (keep in step with bootstrap.sql):
# (code, severity, what it lets a session do to others, SQL condition on pg_proc p).
_SESSION_FUNCTIONS = (
    ("ROLE_CAN_SIGNAL_SESSIONS", "error",
     "A session may cancel or terminate any other session of the same role: all tenants share the "
     "runtime role, so one tenant's request can end another tenant's transaction (and its work).",
     "p.proname IN ('pg_terminate_backend', 'pg_cancel_backend')"),
    ("ROLE_CAN_LOCK_ADVISORY", "error",
     "An advisory lock is session state that RLS does not scope: a session-level lock outlives the "
     "transaction on a pooled connection, tenants can signal each other through lock ids, and a "
     "tenant holding `rtv-db migrate`'s lock id makes every migration wait.",
     r"(p.proname LIKE 'pg\_advisory\_%%' OR p.proname LIKE 'pg\_try\_advisory\_%%')"),
    ("ROLE_CAN_USE_LARGE_OBJECTS", "error",
     "Large objects are not rows of a tenant table: RLS does not cover them, and an object one "
     "tenant creates is readable and writable by every session of the same role, that is, by every "
     "other tenant.",
     r"(p.proname LIKE 'lo\_%%' OR p.proname IN ('loread', 'lowrite'))"),
    ("ROLE_CAN_READ_QUERY_TEXT", "error",
     "A role sees the query text of its own other sessions in pg_stat_activity: all tenants share "
     "the runtime role, so one tenant reads another's statements, literals included.",
     r"(p.proname = 'pg_stat_get_activity' OR p.proname LIKE 'pg\_stat\_get\_backend\_%%')"),
)


def _session_objects(conn: Connection, role_oid: int, condition: str, code: str) -> list[tuple[str, bool, bool]]:
    """(object, PUBLIC may use it, the runtime role may use it) for one category."""
    rows = conn.execute(
        f"""
        SELECT 'function ' || p.oid::regprocedure::text,
               p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                          WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'),
               has_function_privilege(%(oid)s, p.oid, 'EXECUTE')
        FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace AND {condition}
        ORDER BY 1
        """,
        {"oid": role_oid},
    ).fetchall()
    if code == "ROLE_CAN_READ_QUERY_TEXT":
        # The views over those functions, and pg_stat_statements when it is installed.
        rows += conn.execute(
            r"""
            SELECT 'view ' || c.oid::regclass::text,
                   EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0 AND a.privilege_type = 'SELECT'),
                   has_table_privilege(%(oid)s, c.oid, 'SELECT')
            FROM pg_class c
            WHERE c.relkind = 'v'
              AND ((c.relnamespace = 'pg_catalog'::regnamespace
                    AND pg_get_viewdef(c.oid) ~ 'pg_stat_get_activity|pg_stat_get_backend_')
                   OR c.oid IN (SELECT d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                                WHERE e.extname = 'pg_stat_statements' AND d.deptype = 'e'
                                  AND d.classid = 'pg_class'::regclass))
            UNION ALL
            SELECT 'function ' || p.oid::regprocedure::text,
                   p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                              WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'),
                   has_function_privilege(%(oid)s, p.oid, 'EXECUTE')
            FROM pg_proc p
            JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
            JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_stat_statements'
            WHERE p.proname = 'pg_stat_statements'
            ORDER BY 1
            """,
            {"oid": role_oid},
        ).fetchall()
    return [(name, bool(public), bool(held)) for name, public, held in rows]


def _names(objects: list[str], limit: int = 8) -> str:
    shown = ", ".join(o.split(" ", 1)[1] for o in objects[:limit])
    return shown + (f" and {len(objects) - limit} more" if len(objects) > limit else "")


@register_check
def check_runtime_role_sessions(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Sessions of the runtime role must not act on each other: `rtv-db migrate` revokes from PUBLIC
    the functions that signal other backends, take advisory locks, use large objects, or read
    other sessions' query text; neither PUBLIC nor the runtime role may use them."""
    role = config.runtime_role
    row = conn.execute("SELECT oid, rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    if row is None:
        return  # ROLE_MISSING
    role_oid, is_super = row
    for code, severity, why, condition in _SESSION_FUNCTIONS:
        objects = _session_objects(conn, role_oid, condition, code)
        public = [name for name, by_public, _held in objects if by_public]
        direct = [name for name, by_public, held in objects if held and not by_public]
        what = {
            "ROLE_CAN_SIGNAL_SESSIONS": "signal other sessions",
            "ROLE_CAN_LOCK_ADVISORY": "take advisory locks",
            "ROLE_CAN_USE_LARGE_OBJECTS": "use large objects",
            "ROLE_CAN_READ_QUERY_TEXT": "read other sessions' query text",
        }[code]
        for grantee, names in (("PUBLIC", public), (f"role {role}", direct if not is_super else [])):
            if not names:
                continue
            functions = [n[len("function "):] for n in names if n.startswith("function ")]
            views = [n[len("view "):] for n in names if n.startswith("view ")]
            grantees = "PUBLIC" if grantee == "PUBLIC" else role
            revokes = []
            if functions:
                listed = ", ".join(functions) if len(functions) <= 4 else "<each function above>"
                revokes.append(f"REVOKE EXECUTE ON FUNCTION {listed} FROM {grantees};")
            if views:
                revokes.append(f"REVOKE SELECT ON {', '.join(views)} FROM {grantees};")
            who = (f"PUBLIC (every role, {role} included)" if grantee == "PUBLIC"
                   else f"the runtime role {role} (not through PUBLIC)")
            yield Finding(
                code, severity, grantee,
                f"{who} may {what} in this database: {_names(names, limit=len(names))}",
                why,
                "Run `rtv-db migrate` as a superuser (it revokes these from PUBLIC and the runtime role "
                "in this database; rtv-db's own roles need none of them), or " + " ".join(revokes),
            )
