"""Row-Level Security (S0-B3): the tenant context functions and a policy on every tenant table.

The context is three settings, ``app.current_tenant_id``, ``app.current_platform_account_id``
and ``app.current_lane``, always set with ``SET LOCAL`` (by ``rtv.set_tenant_context``), so it
ends with the transaction and can never leak through a pooled connection. On Citus, ``SET
LOCAL`` reaches the workers where ``set_config(..., true)`` does not.

Policies read the context only through ``rtv.current_tenant_id()`` and its siblings, wrapped in
a scalar subselect so that PostgreSQL evaluates it once per statement (an InitPlan). A missing,
empty or malformed setting reads as NULL: zero rows, rejected writes, never a cast error.

Every table gets ENABLE and FORCE: FORCE makes the policies bind the table owner too.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from rtv_db.migrations._sql import run

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run("""
    -- Reading the context ------------------------------------------------------------------

    -- text -> uuid without ever raising: anything but a well-formed UUID is NULL.
    CREATE FUNCTION rtv.to_uuid_or_null(value text) RETURNS uuid
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT CASE
            WHEN value ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
            THEN value::uuid
        END
    $$;

    CREATE FUNCTION rtv.current_tenant_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT rtv.to_uuid_or_null(current_setting('app.current_tenant_id', true)) $$;

    CREATE FUNCTION rtv.current_platform_account_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT rtv.to_uuid_or_null(current_setting('app.current_platform_account_id', true)) $$;

    CREATE FUNCTION rtv.current_lane() RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
        SELECT CASE WHEN lane IN ('api', 'browser') THEN lane END
        FROM current_setting('app.current_lane', true) AS lane
    $$;

    CREATE FUNCTION rtv.current_user_id() RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('app.current_user_id', true), '') $$;

    CREATE FUNCTION rtv.current_correlation_id() RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('app.correlation_id', true), '') $$;

    -- Setting the context --------------------------------------------------------------------

    -- Transaction-local (SET LOCAL), validating, one call for all three dimensions.
    -- No SET clause on this function: a function-level SET would undo the SET LOCAL on return.
    -- user_id and correlation_id are not isolation: they label audit events.
    CREATE FUNCTION rtv.set_tenant_context(
        tenant_id uuid,
        platform_account_id uuid DEFAULT NULL,
        lane text DEFAULT NULL,
        user_id text DEFAULT NULL,
        correlation_id text DEFAULT NULL
    ) RETURNS void
        LANGUAGE plpgsql VOLATILE
    AS $$
    BEGIN
        IF tenant_id IS NULL THEN
            RAISE EXCEPTION 'rtv.set_tenant_context: tenant_id is required'
                USING ERRCODE = 'null_value_not_allowed';
        END IF;
        IF lane IS NOT NULL AND lane NOT IN ('api', 'browser') THEN
            RAISE EXCEPTION 'rtv.set_tenant_context: lane must be api or browser'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        EXECUTE pg_catalog.format('SET LOCAL app.current_tenant_id = %L', tenant_id);
        EXECUTE pg_catalog.format('SET LOCAL app.current_platform_account_id = %L',
                                  COALESCE(platform_account_id::text, ''));
        EXECUTE pg_catalog.format('SET LOCAL app.current_lane = %L', COALESCE(lane, ''));
        EXECUTE pg_catalog.format('SET LOCAL app.current_user_id = %L', COALESCE(user_id, ''));
        EXECUTE pg_catalog.format('SET LOCAL app.correlation_id = %L', COALESCE(correlation_id, ''));
    END
    $$;

    CREATE FUNCTION rtv.clear_tenant_context() RETURNS void
        LANGUAGE plpgsql VOLATILE
    AS $$
    BEGIN
        SET LOCAL app.current_tenant_id = '';
        SET LOCAL app.current_platform_account_id = '';
        SET LOCAL app.current_lane = '';
        SET LOCAL app.current_user_id = '';
        SET LOCAL app.correlation_id = '';
    END
    $$;

    -- The spec's name for reading the tenant back.
    CREATE FUNCTION rtv.get_current_tenant() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT rtv.current_tenant_id() $$;

    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA rtv FROM PUBLIC;
    GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA rtv TO @runtime@, @system@;

    -- Policies ----------------------------------------------------------------------------------

    -- A tenant sees and updates only its own client row.
    ALTER TABLE clients ENABLE ROW LEVEL SECURITY;
    ALTER TABLE clients FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON clients
        USING (id = (SELECT rtv.current_tenant_id()))
        WITH CHECK (id = (SELECT rtv.current_tenant_id()));

    ALTER TABLE platform_accounts ENABLE ROW LEVEL SECURITY;
    ALTER TABLE platform_accounts FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON platform_accounts
        USING (client_id = (SELECT rtv.current_tenant_id()))
        WITH CHECK (client_id = (SELECT rtv.current_tenant_id()));

    ALTER TABLE brand_kits ENABLE ROW LEVEL SECURITY;
    ALTER TABLE brand_kits FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON brand_kits
        USING (client_id = (SELECT rtv.current_tenant_id()))
        WITH CHECK (client_id = (SELECT rtv.current_tenant_id()));

    ALTER TABLE knowledge_bases ENABLE ROW LEVEL SECURITY;
    ALTER TABLE knowledge_bases FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON knowledge_bases
        USING (client_id = (SELECT rtv.current_tenant_id()))
        WITH CHECK (client_id = (SELECT rtv.current_tenant_id()));

    ALTER TABLE knowledge_chunks ENABLE ROW LEVEL SECURITY;
    ALTER TABLE knowledge_chunks FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON knowledge_chunks
        USING (client_id = (SELECT rtv.current_tenant_id()))
        WITH CHECK (client_id = (SELECT rtv.current_tenant_id()));

    -- Platform actions also need the platform account and lane of the context.
    ALTER TABLE platform_actions ENABLE ROW LEVEL SECURITY;
    ALTER TABLE platform_actions FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON platform_actions
        USING (
            client_id = (SELECT rtv.current_tenant_id())
            AND platform_account_id = (SELECT rtv.current_platform_account_id())
            AND lane = (SELECT rtv.current_lane())
        )
        WITH CHECK (
            client_id = (SELECT rtv.current_tenant_id())
            AND platform_account_id = (SELECT rtv.current_platform_account_id())
            AND lane = (SELECT rtv.current_lane())
        );
    """)


def downgrade() -> None:
    run("""
    DROP POLICY tenant_isolation ON platform_actions;
    DROP POLICY tenant_isolation ON knowledge_chunks;
    DROP POLICY tenant_isolation ON knowledge_bases;
    DROP POLICY tenant_isolation ON brand_kits;
    DROP POLICY tenant_isolation ON platform_accounts;
    DROP POLICY tenant_isolation ON clients;
    ALTER TABLE platform_actions NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
    ALTER TABLE knowledge_chunks NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
    ALTER TABLE knowledge_bases NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
    ALTER TABLE brand_kits NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
    ALTER TABLE platform_accounts NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
    ALTER TABLE clients NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY;
    DROP FUNCTION rtv.get_current_tenant();
    DROP FUNCTION rtv.clear_tenant_context();
    DROP FUNCTION rtv.set_tenant_context(uuid, uuid, text, text, text);
    DROP FUNCTION rtv.current_correlation_id();
    DROP FUNCTION rtv.current_user_id();
    DROP FUNCTION rtv.current_lane();
    DROP FUNCTION rtv.current_platform_account_id();
    DROP FUNCTION rtv.current_tenant_id();
    DROP FUNCTION rtv.to_uuid_or_null(text);
    """)
