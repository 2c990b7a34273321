r"""No planner statistics on tenant content (issue 16, item 3).

The planner's statistics (most common values, histograms) are computed over all tenants' rows,
and the runtime role sees what they imply through row estimates: ``EXPLAIN SELECT * FROM
brand_kits WHERE name LIKE 'Brand%'`` estimated 426 rows against 1 for ``'Zzz%'``, which recovered
another tenant's name prefix character by character, and range probes on ``created_at`` showed
when other tenants wrote. RLS does not apply to statistics.

This revision sets ``STATISTICS 0`` on every column of the tenant tables except ``client_id``
and ``id`` (the tenant and the keys the plans need): ``ANALYZE`` then collects nothing for them,
and the planner uses its fixed default selectivities, the same whatever any tenant stored. The
``client_id`` indexes are still chosen (their column keeps its statistics). Existing statistics
of those columns are dropped by re-stating each column's own type (no rewrite; PostgreSQL
removes a column's statistics on ALTER COLUMN TYPE, and only a superuser may delete them
otherwise; a column a policy uses, platform_actions' account and lane, cannot be re-typed and
keeps what was collected before this revision until a superuser deletes it); ``ANALYZE`` then
collects none. What statistics still reveal: docs/statistics.md.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-15
"""

from rtv_db.migrations._sql import run

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = r"""
    SELECT c.oid::regclass AS tab, quote_ident(a.attname) AS col, format_type(a.atttypid, a.atttypmod) AS typ,
           EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid
                   AND d.refobjsubid = a.attnum AND d.classid = 'pg_policy'::regclass) AS in_policy
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
      AND (EXISTS (SELECT 1 FROM pg_attribute t WHERE t.attrelid = c.oid AND t.attname = 'client_id'
                   AND NOT t.attisdropped) OR c.relname = 'clients')
      AND a.attname NOT IN ('client_id', 'id')
    ORDER BY 1, 2
"""


def _set_statistics(target: int) -> None:
    run(rf"""
    DO $stats$
    DECLARE
        item record;
    BEGIN
        FOR item IN {_COLUMNS} LOOP
            EXECUTE format('ALTER TABLE %s ALTER COLUMN %s SET STATISTICS {target}', item.tab, item.col);
            IF {target} = 0 AND NOT item.in_policy THEN
                -- Re-stating the column's own type rewrites nothing but drops its collected
                -- statistics (only a superuser may DELETE FROM pg_statistic).
                EXECUTE format('ALTER TABLE %s ALTER COLUMN %s TYPE %s', item.tab, item.col, item.typ);
            END IF;
        END LOOP;
    END
    $stats$;
    """)


def upgrade() -> None:
    _set_statistics(0)
    run("""
    ANALYZE public.clients, public.platform_accounts, public.brand_kits, public.knowledge_bases,
            public.knowledge_chunks, public.platform_actions, public.audit_events;
    """)


def downgrade() -> None:
    _set_statistics(-1)
