"""Audit trail (S0-B4): an append-only ``audit_events`` table, filled by a trigger on every tenant table.

Every INSERT, UPDATE and DELETE on a tenant table, whoever makes it (the tenant-scoped API, raw
SQL on the runtime role, the system scope, a cascade), writes one ``audit_events`` row in the
same transaction: a rollback removes it with the change, a commit keeps both. An event names
the tenant, the context's platform account, lane, user id and correlation id, the action, the
table, the row's id, and for an UPDATE the *names* of the columns whose values changed. Values
are never copied: a secret written to a row does not reach the trail.

Who may do what (the table is owned by the owner role, with RLS enabled and forced):

* The runtime role may only SELECT, and RLS shows it its own tenant's events. It holds no
  INSERT, UPDATE, DELETE or TRUNCATE: it cannot forge, change or erase an event.
* The trigger function is SECURITY DEFINER, owned by the owner, with a fixed ``search_path``.
  That is the only way rows get in. (The alternative, granting INSERT to the runtime role under
  a tenant WITH CHECK and a SECURITY INVOKER trigger, would let a tenant forge events about
  itself with a plain INSERT; here it cannot.) FORCE binds the owner too, so the owner gets an
  INSERT policy: the event's tenant must be the context's tenant when a context is set (a
  tenant transaction can only produce events about its own tenant), and may be any tenant when
  none is set (the system scope, which bypasses RLS, writes across tenants; the event carries
  the changed row's ``client_id``, never the context's).
* UPDATE: nobody (no grant, and a restrictive policy that is always false, so even the owner
  role is refused).
* DELETE: only through ``rtv.purge_audit_events(older_than)``, the retention command, callable
  by the owner or the admin login only. Its policy lets the owner delete an event only when it
  is older than the cutoff the purge function declares for its own transaction.

Bulk loads: the system role (and only it: the check is on ``session_user``, which the runtime
role cannot change) may skip auditing for a transaction with ``SET LOCAL
rtv.audit_bulk_load = 'on'``, for synthetic benchmark data. The runtime role setting the same
variable changes nothing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from rtv_db.migrations._sql import run

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TENANT_TABLES = ("clients", "platform_accounts", "brand_kits", "knowledge_bases", "knowledge_chunks", "platform_actions")


def upgrade() -> None:
    run("""
    CREATE TABLE audit_events (
        client_id           uuid        NOT NULL,
        -- Random, not a sequence: a global sequence would show a tenant, through the gaps in
        -- its own events' ids, how much every other tenant writes.
        id                  uuid        NOT NULL DEFAULT gen_random_uuid(),
        -- clock_timestamp, not now(): the events of one transaction keep their order.
        occurred_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
        action              text        NOT NULL,
        table_name          text        NOT NULL,
        -- Every tenant table's rows are keyed by a uuid id (with client_id); clients by id.
        row_id              uuid        NOT NULL,
        -- UPDATE: the names of the columns whose values differ (never the values). NULL for
        -- INSERT and DELETE, which concern the whole row.
        changed_columns     text[],
        platform_account_id uuid,
        lane                text,
        user_id             text,
        correlation_id      text,
        -- The login that made the change (rtv_app, rtv_system, an admin): session_user, which
        -- a SET ROLE does not change.
        db_role             text        NOT NULL DEFAULT SESSION_USER,
        -- occurred_at in the key: newest-first pages of one tenant are one backward index
        -- scan, and the table can later be range-partitioned by time for retention.
        CONSTRAINT audit_events_pkey PRIMARY KEY (client_id, occurred_at, id),
        CONSTRAINT audit_events_action_check CHECK (action IN ('INSERT', 'UPDATE', 'DELETE'))
    );
    -- The history of one resource.
    CREATE INDEX audit_events_client_id_row_id_idx ON audit_events (client_id, row_id);
    COMMENT ON TABLE audit_events IS
        'Append-only audit trail of tenant tables: names of changed columns, never values';

    ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY;
    ALTER TABLE audit_events FORCE ROW LEVEL SECURITY;

    -- Reading: a tenant sees its own events, like any tenant table.
    CREATE POLICY tenant_isolation ON audit_events
        FOR SELECT
        USING (client_id = (SELECT rtv.current_tenant_id()));

    -- Writing: only the owner holds INSERT, and only the trigger function runs as the owner.
    CREATE POLICY audit_events_trigger_insert ON audit_events
        FOR INSERT TO @owner@
        -- With a tenant context: that tenant only. Without (system scope): the row's own.
        -- COALESCE, not "IS NULL OR ...": one context read per event instead of two.
        WITH CHECK (client_id = COALESCE((SELECT rtv.current_tenant_id()), client_id));

    -- Append-only, stated as a policy too: no row may ever be updated, by anyone RLS binds.
    CREATE POLICY audit_events_append_only ON audit_events
        AS RESTRICTIVE FOR UPDATE
        USING (false)
        WITH CHECK (false);

    -- Retention: the cutoff is NULL (nothing matches) unless rtv.purge_audit_events set it for
    -- its own transaction. DELETE reads rows, so the owner needs a SELECT policy to match.
    CREATE FUNCTION rtv.audit_purge_cutoff() RETURNS timestamptz
        LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('rtv.audit_purge_cutoff', true), '')::timestamptz $$;

    CREATE POLICY audit_events_retention_read ON audit_events
        FOR SELECT TO @owner@
        USING (occurred_at < (SELECT rtv.audit_purge_cutoff()));
    CREATE POLICY audit_events_retention_delete ON audit_events
        FOR DELETE TO @owner@
        USING (occurred_at < (SELECT rtv.audit_purge_cutoff()));

    REVOKE ALL ON audit_events FROM PUBLIC;
    GRANT SELECT ON audit_events TO @runtime@, @system@;

    -- The trigger --------------------------------------------------------------------------------

    -- SECURITY DEFINER: it runs as the owner, the only role that may insert events. The fixed
    -- search_path keeps a caller from substituting its own objects; every name is qualified.
    CREATE FUNCTION rtv.audit_row_change() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, public
    AS $$
    DECLARE
        tenant  uuid;
        row_key uuid;
        changed text[];
        old_row jsonb;
    BEGIN
        -- Bulk synthetic loads by the system role only. The setting is checked first (it is
        -- unset on every ordinary write, so the role lookup is never paid there).
        IF current_setting('rtv.audit_bulk_load', true) = 'on'
           AND session_user::text = ('@system@'::regrole)::text THEN
            RETURN NULL;
        END IF;

        -- The tenant column is the trigger's argument: client_id, or id for clients. (Each
        -- branch names one field: PL/pgSQL resolves a field only when its statement runs.)
        IF TG_OP = 'DELETE' THEN
            row_key := OLD.id;
            IF TG_ARGV[0] = 'id' THEN tenant := OLD.id; ELSE tenant := OLD.client_id; END IF;
        ELSE
            row_key := NEW.id;
            IF TG_ARGV[0] = 'id' THEN tenant := NEW.id; ELSE tenant := NEW.client_id; END IF;
            IF TG_OP = 'UPDATE' THEN
                -- Names of the columns whose values differ; the values are compared, not kept.
                old_row := to_jsonb(OLD);
                SELECT coalesce(array_agg(n.key ORDER BY n.key), '{}')
                  INTO changed
                  FROM jsonb_each(to_jsonb(NEW)) AS n
                 WHERE n.value IS DISTINCT FROM old_row -> n.key;
            END IF;
        END IF;

        -- TG_ARGV[1], when given, is the table's logical name: on Citus the trigger fires on
        -- a shard (brand_kits_102008), and the distribution step passes the name. The
        -- triggers below pass one argument, so here it is NULL and TG_TABLE_NAME is used.
        INSERT INTO public.audit_events
            (client_id, action, table_name, row_id, changed_columns,
             platform_account_id, lane, user_id, correlation_id)
        VALUES
            (tenant, TG_OP, COALESCE(TG_ARGV[1], TG_TABLE_NAME), row_key, changed,
             rtv.current_platform_account_id(), rtv.current_lane(),
             rtv.current_user_id(), rtv.current_correlation_id());
        RETURN NULL;
    END
    $$;
    -- A trigger function cannot be called directly anyway; nobody needs EXECUTE to fire it.
    REVOKE ALL ON FUNCTION rtv.audit_row_change() FROM PUBLIC;
    """)
    for table in TENANT_TABLES:
        tenant_column = "id" if table == "clients" else "client_id"
        run(f"""
        CREATE TRIGGER audit_row_change
            AFTER INSERT OR UPDATE OR DELETE ON {table}
            FOR EACH ROW EXECUTE FUNCTION rtv.audit_row_change('{tenant_column}');
        """)
    run("""
    -- Retention ----------------------------------------------------------------------------------

    -- Deletes the events older than older_than, across tenants; returns how many. SECURITY
    -- DEFINER so that it runs as the owner (whose policies above allow exactly this delete);
    -- EXECUTE is revoked from everyone, so only the owner and its members (the admin login) or a
    -- superuser may call it. The session_user check holds even if EXECUTE is granted by mistake.
    CREATE FUNCTION rtv.purge_audit_events(older_than interval) RETURNS bigint
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, public
    AS $$
    DECLARE
        removed bigint;
    BEGIN
        IF NOT pg_has_role(session_user, '@owner@'::regrole, 'USAGE') THEN
            RAISE EXCEPTION 'rtv.purge_audit_events: only the owner role or an admin may purge audit events'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF older_than IS NULL OR older_than < interval '0' THEN
            RAISE EXCEPTION 'rtv.purge_audit_events: older_than must be a non-negative interval'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        PERFORM set_config('rtv.audit_purge_cutoff', (clock_timestamp() - older_than)::text, true);
        DELETE FROM public.audit_events WHERE occurred_at < rtv.audit_purge_cutoff();
        GET DIAGNOSTICS removed = ROW_COUNT;
        PERFORM set_config('rtv.audit_purge_cutoff', '', true);
        RETURN removed;
    END
    $$;
    REVOKE ALL ON FUNCTION rtv.purge_audit_events(interval) FROM PUBLIC;
    -- The cutoff reader is used by the owner's policies only.
    REVOKE ALL ON FUNCTION rtv.audit_purge_cutoff() FROM PUBLIC;
    """)


def downgrade() -> None:
    for table in reversed(TENANT_TABLES):
        run(f"DROP TRIGGER audit_row_change ON {table};")
    run("""
    DROP FUNCTION rtv.purge_audit_events(interval);
    DROP FUNCTION rtv.audit_row_change();
    DROP TABLE audit_events;
    DROP FUNCTION rtv.audit_purge_cutoff();
    """)
