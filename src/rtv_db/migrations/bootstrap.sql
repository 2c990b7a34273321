-- rtv-db bootstrap: what needs a superuser (or CREATEROLE) login, run by `rtv-db migrate`
-- before the Alembic revisions. Idempotent: run twice, it changes nothing.
-- {owner}, {runtime}, {system}, {database} are quoted identifiers; {runtime_password} and
-- {system_password} are quoted literals (or NULL); {statement_timeout_ms},
-- {idle_in_transaction_timeout_ms} and {temp_file_limit_kb} are integer literals. Every attribute
-- is stated, so a role that was altered by hand is put back. Written for a superuser admin login:
-- only a superuser can revoke on pg_catalog functions and set the log_* parameters and
-- temp_file_limit (a lesser login gets a WARNING for each step it cannot do, and `rtv-db verify`
-- reports what is missing).

-- The owner: owns every table, function and policy. Nobody logs in as it; migrations SET ROLE to it.
DO $bootstrap$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {owner_name}) THEN
        CREATE ROLE {owner} NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {runtime_name}) THEN
        CREATE ROLE {runtime} LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {system_name}) THEN
        CREATE ROLE {system} LOGIN;
    END IF;
END
$bootstrap$;

ALTER ROLE {owner}   NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
-- The runtime role: what the application connects as. It owns nothing and cannot bypass RLS.
ALTER ROLE {runtime} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT
    PASSWORD {runtime_password};
-- The system role: the explicit cross-tenant scope (seeding, maintenance). BYPASSRLS, never the default.
ALTER ROLE {system}  LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION BYPASSRLS NOINHERIT
    PASSWORD {system_password};

-- The login running migrations must be able to SET ROLE to the owner.
GRANT {owner} TO CURRENT_USER;

-- The owner creates its schema and objects in this database; nobody else creates anything.
GRANT CREATE, CONNECT ON DATABASE {database} TO {owner};
GRANT CONNECT ON DATABASE {database} TO {runtime}, {system};
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO {owner};
-- No temporary objects for anyone but the admin: a pg_temp function is a classic way to smuggle
-- code into another role's query.
REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC;

-- pgvector is not a trusted extension: it is created here, by the admin login.
CREATE EXTENSION IF NOT EXISTS vector SCHEMA public;

-- The runtime role's own settings (pg_db_role_setting). The runtime role may change its own
-- defaults (`ALTER ROLE current_user SET search_path = pg_catalog`, `... IN DATABASE ... SET
-- statement_timeout = 0`), and every later connection of every tenant inherits them: reset all of
-- them, everywhere, then install exactly these. The runtime-role guard (connection.py) puts back,
-- at connect, what the runtime role itself may put back (and reconnects), refuses what it may not,
-- and `rtv-db verify` reports any difference.
-- Every setting of the runtime role belongs HERE: one installed anywhere else (a revision) would
-- be removed by the next migrate and refused at connect.
ALTER ROLE {runtime} RESET ALL;
ALTER ROLE {runtime} IN DATABASE {database} RESET ALL;
-- Timeouts as role settings, not startup options: they hold behind a pooler (PgBouncer refuses or
-- drops startup options), and a tenant's statement or open transaction cannot run for ever.
ALTER ROLE {runtime} IN DATABASE {database} SET statement_timeout = {statement_timeout_ms};
ALTER ROLE {runtime} IN DATABASE {database} SET idle_in_transaction_session_timeout = {idle_in_transaction_timeout_ms};
-- The signed tenant-context token travels as a bind parameter: never write bind parameters of the
-- runtime role's statements to the server log (statement logging, or the log line of an error).
-- The runtime role cannot change these itself (they are superuser-only parameters).
DO $log_parameters$
BEGIN
    IF pg_catalog.has_parameter_privilege('log_parameter_max_length', 'SET')
       AND pg_catalog.has_parameter_privilege('log_parameter_max_length_on_error', 'SET') THEN
        EXECUTE pg_catalog.format('ALTER ROLE %I IN DATABASE %I SET log_parameter_max_length = 0',
                                  {runtime_name}, pg_catalog.current_database());
        EXECUTE pg_catalog.format('ALTER ROLE %I IN DATABASE %I SET log_parameter_max_length_on_error = 0',
                                  {runtime_name}, pg_catalog.current_database());
    ELSE
        RAISE WARNING 'rtv-db: % may not set log_parameter_max_length: bind parameters of % may reach the server log',
            current_user, {runtime_name};
    END IF;
END
$log_parameters$;
-- Temporary files: one sort or hash of one tenant's statement may not fill the server's disk
-- (temp_file_limit is -1, unbounded, by default). Per process: a parallel query's workers have one
-- each. A superuser-only parameter: the runtime role can neither SET it (permission denied) nor
-- change its own default. An admin login that may not set it (a managed host) leaves it unbounded
-- and says so; the runtime-role guard then refuses the role (its settings are not migrate's).
DO $temp_files$
BEGIN
    IF pg_catalog.has_parameter_privilege('temp_file_limit', 'SET') THEN
        EXECUTE pg_catalog.format('ALTER ROLE %I IN DATABASE %I SET temp_file_limit = %s',
                                  {runtime_name}, pg_catalog.current_database(), {temp_file_limit_kb});
    ELSE
        RAISE WARNING 'rtv-db: % may not set temp_file_limit: the temporary files of one statement of % are unbounded',
            current_user, {runtime_name};
    END IF;
END
$temp_files$;
-- On a Citus coordinator the runtime role also needs citus.propagate_set_commands = 'local' (the
-- SET LOCAL tenant context reaches the workers; see citus/apply.py). Put back here, after RESET ALL,
-- so that the role is never without it between this transaction and the distribution step.
DO $citus$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        EXECUTE pg_catalog.format('ALTER ROLE %I IN DATABASE %I SET citus.propagate_set_commands = %L',
                                  {runtime_name}, pg_catalog.current_database(), 'local');
    END IF;
END
$citus$;

-- On Citus, Citus's run_command_* functions (EXECUTE granted to PUBLIC) let any login run any SQL
-- on every worker over its own connections: the runtime role could query the shards directly,
-- and act on other sessions there. Nobody but the admin needs them. The same block runs on every
-- worker (with the session hardening below), from the distribution step of `rtv-db migrate`.
DO $citus_commands$
DECLARE
    target text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus')
       OR NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RETURN;
    END IF;
    FOR target IN
        SELECT p.oid::pg_catalog.regprocedure::text
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid
                                   AND d.deptype = 'e'
        JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'citus'
        WHERE p.proname LIKE 'run\_command\_on\_%' OR p.proname IN ('master_run_on_worker', 'citus_run_local_command')
        ORDER BY 1
    LOOP
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC, %I', target, {runtime_name});
    END LOOP;
END
$citus_commands$;

-- Sessions of the runtime role must not act on each other or hold state beyond a transaction.
-- All tenants share the one runtime role, and PostgreSQL lets a role signal, inspect and lock
-- against its own other sessions: revoke from PUBLIC (and from the runtime role, had anyone granted
-- it directly), in this database (pg_proc and pg_class are per database, so this holds here and in
-- databases later copied from this one):
--   * pg_terminate_backend, pg_cancel_backend: tenant A ending or cancelling tenant B's session;
--   * every advisory lock function (session and xact level, bigint and int4 pairs, shared, try_,
--     unlock, unlock_all): a session-level lock outlives the transaction on a pooled connection,
--     and holding `rtv-db migrate`'s lock id makes every migration wait. `migrate` takes its lock
--     (pg_advisory_xact_lock) as the admin login, a superuser, which needs no grant; no other
--     rtv-db role takes advisory locks, so nothing is granted back;
--   * every large-object function (lo_*, loread, lowrite): large objects are not rows of a tenant
--     table, RLS does not cover them, and one tenant's object is readable by every session of the
--     same role;
--   * other sessions' query text (literals included): pg_stat_get_activity and the
--     pg_stat_get_backend_* functions, and SELECT on the views built on them (pg_stat_activity,
--     pg_stat_ssl, pg_stat_gssapi, pg_stat_replication); also pg_stat_statements when installed.
-- Only a superuser (the functions' owner) can revoke these; `rtv-db verify` checks the result.
DO $sessions$
DECLARE
    target text;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE WARNING 'rtv-db: % is not a superuser: session functions stay executable by PUBLIC (see rtv-db verify)',
            current_user;
        RETURN;
    END IF;
    FOR target IN
        SELECT p.oid::pg_catalog.regprocedure::text
        FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace
          AND (p.proname IN ('pg_terminate_backend', 'pg_cancel_backend', 'pg_stat_get_activity', 'loread', 'lowrite')
               OR p.proname LIKE 'pg\_advisory\_%' OR p.proname LIKE 'pg\_try\_advisory\_%'
               OR p.proname LIKE 'lo\_%'
               OR p.proname LIKE 'pg\_stat\_get\_backend\_%')
        UNION ALL
        SELECT p.oid::pg_catalog.regprocedure::text
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid
                                   AND d.deptype = 'e'
        JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_stat_statements'
        WHERE p.proname = 'pg_stat_statements'
        ORDER BY 1
    LOOP
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC, %I', target, {runtime_name});
    END LOOP;
    FOR target IN
        SELECT c.oid::pg_catalog.regclass::text
        FROM pg_catalog.pg_class c
        WHERE c.relkind = 'v'
          AND ((c.relnamespace = 'pg_catalog'::pg_catalog.regnamespace
                AND pg_catalog.pg_get_viewdef(c.oid) ~ 'pg_stat_get_activity|pg_stat_get_backend_')
               OR c.oid IN (SELECT d.objid FROM pg_catalog.pg_depend d
                            JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_stat_statements'
                            WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.deptype = 'e'))
        ORDER BY 1
    LOOP
        EXECUTE pg_catalog.format('REVOKE SELECT ON %s FROM PUBLIC, %I', target, {runtime_name});
    END LOOP;
END
$sessions$;

-- rtv.set_signed_context (revision 0010; SECURITY DEFINER, it runs as the owner) marks each tenant
-- transaction for `rtv-db watchdog` with two shared transaction-level advisory locks. The block
-- above took the advisory lock functions from PUBLIC; the owner gets these two back. The owner is
-- NOLOGIN and no login is a member of it but the migrating admin: the runtime role still has none.
DO $watchdog_marks$
BEGIN
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        GRANT EXECUTE ON FUNCTION pg_catalog.pg_advisory_xact_lock_shared(bigint),
            pg_catalog.pg_advisory_xact_lock_shared(integer, integer) TO {owner};
    END IF;
END
$watchdog_marks$;
