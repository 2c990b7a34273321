-- rtv-db bootstrap: what needs a superuser (or CREATEROLE) login, run by `rtv-db migrate`
-- before the Alembic revisions. Idempotent: run twice, it changes nothing.
-- {owner}, {runtime}, {system}, {database} are quoted identifiers; {runtime_password} and
-- {system_password} are quoted literals (or NULL). Every attribute is stated, so a role
-- that was altered by hand is put back.

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
