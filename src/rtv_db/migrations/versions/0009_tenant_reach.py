r"""No index, statistic or audit gap a tenant can reach across tenants (issue 24, items 1, 10, 12).

Three things SQL injected in tenant A's transaction (on the runtime role) could still do on 0008:

* **List every tenant's slug through EXPLAIN ANALYZE (item 1).** ``clients_slug_key`` was a
  unique constraint on ``slug``. Text comparison is leakproof, so with the planner's switches set
  (``enable_seqscan = off``, ``enable_sort = off``) ``SELECT * FROM clients WHERE slug > 'm'
  ORDER BY slug`` scans that index with the range as its index condition *before* the policy's
  filter, and ``Rows Removed by Filter`` counts the other tenants' slugs in the range: bisecting
  the alphabet lists them all. From here on the uniqueness is a unique *expression* index of the
  same name on ``rtv_secret.slug_key(slug)``, an identity function in PL/pgSQL (an SQL function
  would be inlined when the planner loads the index expression, and the index would match
  ``slug > ...`` again). The runtime role has no USAGE on ``rtv_secret``: it cannot name the
  function, so it cannot write the index's expression, so no query of it can use the index.
  Evaluating the expression needs EXECUTE only (an UPDATE of ``clients.name`` that is not HOT adds
  index entries), so EXECUTE is granted to the two roles that write ``clients``. Writing a
  duplicate slug still fails as ``clients_slug_key`` (the system scope creates tenants).
  The index column has ``STATISTICS 0``.
* **Other tenants' ids from planner estimates (item 12).** ``client_id`` (and ``id``) kept their
  statistics in revision 0006; uuid ``<`` is leakproof, so a plain ``EXPLAIN`` of ``client_id <
  X`` stepped its row estimate at every frequent tenant's id. Now every column of every tenant
  table and of ``clients`` has ``STATISTICS 0``, ``client_id`` and ``id`` included, and so has
  every expression column of their indexes. What was collected is cleared with
  ``pg_clear_attribute_stats`` (PostgreSQL 18: the table owner may call it). On an older server
  the statistics already collected stay until a superuser deletes them: ``rtv-db migrate`` does
  it when its login is a superuser, and says so otherwise (``rtv-db verify`` as the admin reports
  TENANT_COLUMN_STATISTICS).
* **Audit events stripped of their labels (item 10).** Calling ``rtv.release_signed_context()``
  inside the writing statement (a CTE, a subquery in VALUES) detached the context after the
  policy had checked the row (with the statement's snapshot) and before the AFTER ROW trigger ran
  (with a new one): the event had no user id, correlation id, lane or account. The audit
  trigger now refuses a write that has no tenant context when it fires, unless the writer is the
  system role or the owner (or the admin, a member of the owner), who write without a context
  by design. A tenant's write is recorded with the context that authorised it, or not at all.
  In unsigned mode (debugging only) the labels are plain settings any SQL may change; the
  trigger still refuses a write whose context is gone.

Each attack, before this revision and now, as the runtime role: tests/test_reach_attacks.py
(docs/statistics.md, docs/audit.md). rtv-db verify reports the classes: INDEX_NOT_TENANT_LED,
TENANT_COLUMN_STATISTICS (docs/verify.md).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from rtv_db.migrations._sql import run

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The tenant tables (a client_id column, or clients itself) of the public schema: every column, and
# every expression column of their indexes, by (relation, attribute name).
_STATISTICS_TARGETS = r"""
    SELECT c.oid AS rel, n.nspname AS nsp, c.relname AS relname, a.attname AS att, a.attnum AS attnum,
           c.relkind IN ('i', 'I') AS is_index
    FROM pg_class t
    JOIN pg_namespace n ON n.oid = t.relnamespace
    JOIN pg_class c ON c.oid = t.oid
                    OR c.oid IN (SELECT i.indexrelid FROM pg_index i WHERE i.indrelid = t.oid)
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE n.nspname = 'public' AND t.relkind IN ('r', 'p')
      AND (EXISTS (SELECT 1 FROM pg_attribute x WHERE x.attrelid = t.oid AND x.attname = 'client_id'
                   AND NOT x.attisdropped) OR t.relname = 'clients')
      -- an index's own columns: only its expressions have statistics of their own
      AND (c.relkind NOT IN ('i', 'I') OR (SELECT i.indkey[a.attnum - 1] FROM pg_index i
                                          WHERE i.indexrelid = c.oid) = 0)
    ORDER BY c.relname, a.attnum
"""

# Revision 0003's audit trigger function with the context check of this revision (item 10). The
# Citus distribution (rtv_db.citus) reads it: the name argument (COALESCE(TG_ARGV[1],
# TG_TABLE_NAME)) and a single INSERT INTO public.audit_events stay as they were.
_AUDIT_FUNCTION = r"""
    CREATE OR REPLACE FUNCTION rtv.audit_row_change() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, public
    AS $$
    DECLARE
        tenant      uuid;
        row_key     uuid;
        changed     text[];
        old_row     jsonb;
        account     uuid;
        lane_label  text;
        user_label  text;
        correlation text;
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

        account := rtv.current_platform_account_id();
        lane_label := rtv.current_lane();
        user_label := rtv.current_user_id();
        correlation := rtv.current_correlation_id();
        -- A write with no context when the trigger fires: the context was released inside the
        -- writing statement (the policy checked the row with the statement's snapshot, this
        -- trigger reads a newer one), and the event would carry no label. Only the system role
        -- and the owner (and its members: the admin) write without a context. Checked only when
        -- every label is empty: rtv-db's own contexts always carry a lane and a correlation id,
        -- so an ordinary write pays nothing for it.
        IF account IS NULL AND lane_label IS NULL AND user_label IS NULL AND correlation IS NULL
           AND session_user::text <> ('@system@'::regrole)::text
           AND NOT pg_has_role(session_user, '@owner@'::regrole, 'USAGE')
           AND rtv.current_tenant_id() IS NULL THEN
            RAISE EXCEPTION 'rtv.audit_row_change: % on % without a tenant context when it is recorded',
                    TG_OP, COALESCE(TG_ARGV[1], TG_TABLE_NAME)
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'a tenant write is recorded with the context that authorised it: the context was released inside the writing statement';
        END IF;

        -- TG_ARGV[1], when given, is the table's logical name: on Citus the trigger fires on
        -- a shard (brand_kits_102008), and the distribution step passes the name. The
        -- triggers below pass one argument, so here it is NULL and TG_TABLE_NAME is used.
        INSERT INTO public.audit_events
            (client_id, action, table_name, row_id, changed_columns,
             platform_account_id, lane, user_id, correlation_id)
        VALUES
            (tenant, TG_OP, COALESCE(TG_ARGV[1], TG_TABLE_NAME), row_key, changed,
             account, lane_label, user_label, correlation);
        RETURN NULL;
    END
    $$;
    REVOKE ALL ON FUNCTION rtv.audit_row_change() FROM PUBLIC;
"""

# Revision 0003's function, as it was until this revision (the downgrade puts it back).
_AUDIT_FUNCTION_0003 = r"""
    CREATE OR REPLACE FUNCTION rtv.audit_row_change() RETURNS trigger
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
    REVOKE ALL ON FUNCTION rtv.audit_row_change() FROM PUBLIC;
"""


def upgrade() -> None:
    # Item 1: the slug's uniqueness behind an expression the runtime role cannot write.
    run(r"""
    -- Identity, in PL/pgSQL so that it is never inlined (an inlined identity would leave the
    -- index on plain `slug`, usable by any range condition). IMMUTABLE: an index expression.
    CREATE FUNCTION rtv_secret.slug_key(slug text) RETURNS text
        LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ BEGIN RETURN slug; END $$;
    REVOKE ALL ON FUNCTION rtv_secret.slug_key(text) FROM PUBLIC;
    -- Index maintenance evaluates it as the writer (EXECUTE; no USAGE on the schema needed).
    GRANT EXECUTE ON FUNCTION rtv_secret.slug_key(text) TO @runtime@, @system@;

    ALTER TABLE clients DROP CONSTRAINT clients_slug_key;
    -- Same name: a duplicate slug is still reported as clients_slug_key (rtv_db._constraints).
    CREATE UNIQUE INDEX clients_slug_key ON clients (rtv_secret.slug_key(slug));
    """)

    # Item 12: no statistics on any column of a tenant table, client_id and id included.
    run(rf"""
    DO $stats$
    DECLARE
        item  record;
        clear boolean := to_regprocedure('pg_catalog.pg_clear_attribute_stats(text, text, text, boolean)') IS NOT NULL;
    BEGIN
        FOR item IN {_STATISTICS_TARGETS} LOOP
            IF item.is_index THEN
                EXECUTE format('ALTER INDEX %I.%I ALTER COLUMN %s SET STATISTICS 0', item.nsp, item.relname, item.attnum);
            ELSE
                EXECUTE format('ALTER TABLE %I.%I ALTER COLUMN %I SET STATISTICS 0', item.nsp, item.relname, item.att);
            END IF;
            IF clear THEN
                -- PostgreSQL 18: the owner clears what ANALYZE collected (also for a partitioned
                -- table's whole tree: inherited).
                PERFORM pg_catalog.pg_clear_attribute_stats(item.nsp, item.relname, item.att, false);
                PERFORM pg_catalog.pg_clear_attribute_stats(item.nsp, item.relname, item.att, true);
            END IF;
        END LOOP;
        IF NOT clear THEN
            RAISE WARNING 'rtv-db 0009: statistics collected before on tenant columns stay until a superuser deletes them (before PostgreSQL 18 nobody else may); rtv-db migrate does it when its login is a superuser';
        END IF;
    END
    $stats$;
    """)

    # Item 10: a tenant's write is recorded with its context, or not at all.
    run(_AUDIT_FUNCTION)


def downgrade() -> None:
    run(_AUDIT_FUNCTION_0003)
    # Back to revision 0006's statistics: client_id and id collect again (the next ANALYZE).
    run(r"""
    DO $stats$
    DECLARE
        item record;
    BEGIN
        FOR item IN
            SELECT c.oid::regclass AS tab, quote_ident(a.attname) AS col
            FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname IN ('client_id', 'id') AND NOT a.attisdropped
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
              AND (EXISTS (SELECT 1 FROM pg_attribute t WHERE t.attrelid = c.oid AND t.attname = 'client_id'
                           AND NOT t.attisdropped) OR c.relname = 'clients')
        LOOP
            EXECUTE format('ALTER TABLE %s ALTER COLUMN %s SET STATISTICS -1', item.tab, item.col);
        END LOOP;
    END
    $stats$;
    """)
    run(r"""
    DROP INDEX clients_slug_key;
    ALTER TABLE clients ADD CONSTRAINT clients_slug_key UNIQUE (slug);
    DROP FUNCTION rtv_secret.slug_key(text);
    """)
