r"""Similarity search without an index over every tenant, and per-tenant HNSW for large tenants (issue 14).

Revision 0001 built one HNSW index over every tenant's embeddings. A search of one tenant that
walks it visits other tenants' vectors and throws them away under RLS: with a selective tenant
filter it returned 0 of 10 rows, and ``EXPLAIN ANALYZE`` reported ``Rows Removed by Filter`` of 1
for a query near the tenant's own chunks against 108 near another tenant's topic, which maps
where other tenants' embeddings lie. This revision drops that index. A tenant's search is then
exact over its own chunks (through the ``client_id`` index), unless the tenant has an index of
its own:

* ``knowledge_chunks.search_key`` is an opaque number per indexed tenant (NULL for the others).
  A large tenant's index is a partial HNSW index ``WHERE search_key = <key>``
  (``rtv-db search index``, rtv_db/search_index.py), so it holds that tenant's vectors only. The
  index's predicate is in the catalog, which every role reads: it shows a number, never the
  tenant id.
* ``rtv_secret.search_indexes`` maps tenants to keys; only the owner reads it. A key, once given,
  stays with its tenant (an index dropped later leaves the rows' keys as they are).
* The trigger ``assign_search_key`` sets ``search_key`` on every insert, and on every update that
  names ``client_id`` or ``search_key``, from that map: no writer chooses it. Without it, SQL
  injected in tenant A's transaction could give A's rows the key of tenant B's index, and B's
  searches would walk A's vectors. It is a BEFORE trigger: it only sets the column.
* ``rtv.current_search_key()`` returns the current tenant's key once its index is ready, NULL
  otherwise; the search API asks it which plan to use.
* ``search_key`` has ``STATISTICS 0`` (as revision 0006 does for tenant content): its statistics
  would give each key's row count to anyone who asks the planner for an estimate.

On Citus the trigger is not created (the distribution plans only rtv's audit trigger): there the
column stays NULL, every search is exact within the tenant's shard, and ``rtv-db search index``
refuses (docs/search.md).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from rtv_db.migrations._sql import run

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run("""
    DROP INDEX knowledge_chunks_embedding_idx;

    ALTER TABLE knowledge_chunks ADD COLUMN search_key integer;
    ALTER TABLE knowledge_chunks ALTER COLUMN search_key SET STATISTICS 0;

    -- state: 'building' while the rows get their key and the index is built, 'ready' once
    -- searches may use it, 'dropped' after `rtv-db search drop` (the key stays with the tenant).
    CREATE TABLE rtv_secret.search_indexes (
        tenant_id  uuid PRIMARY KEY,  -- not client_id: no tenant reads this table, only the owner
        search_key integer NOT NULL UNIQUE CHECK (search_key > 0),
        state      text NOT NULL CHECK (state IN ('building', 'ready', 'dropped')),
        changed_at timestamptz NOT NULL DEFAULT now()
    );
    REVOKE ALL ON rtv_secret.search_indexes FROM PUBLIC;

    -- SECURITY DEFINER: it reads rtv_secret as the owner. Fixed search_path, qualified names.
    CREATE FUNCTION rtv.assign_search_key() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
    BEGIN
        NEW.search_key := (SELECT s.search_key FROM rtv_secret.search_indexes s
                           WHERE s.tenant_id = NEW.client_id);
        RETURN NEW;
    END
    $$;
    REVOKE ALL ON FUNCTION rtv.assign_search_key() FROM PUBLIC;

    CREATE FUNCTION rtv.current_search_key() RETURNS integer
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT s.search_key FROM rtv_secret.search_indexes s
        WHERE s.tenant_id = rtv.current_tenant_id() AND s.state = 'ready'
    $$;
    REVOKE ALL ON FUNCTION rtv.current_search_key() FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION rtv.current_search_key() TO @runtime@, @system@;

    DO $trigger$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
            CREATE TRIGGER assign_search_key
                BEFORE INSERT OR UPDATE OF client_id, search_key ON public.knowledge_chunks
                FOR EACH ROW EXECUTE FUNCTION rtv.assign_search_key();
        END IF;
    END
    $trigger$;
    """)


def downgrade() -> None:
    # Dropping the column drops every per-tenant index with it (their predicate names it).
    run("""
    DROP TRIGGER IF EXISTS assign_search_key ON knowledge_chunks;
    DROP FUNCTION rtv.assign_search_key();
    DROP FUNCTION rtv.current_search_key();
    DROP TABLE rtv_secret.search_indexes;
    ALTER TABLE knowledge_chunks DROP COLUMN search_key;
    CREATE INDEX knowledge_chunks_embedding_idx
        ON knowledge_chunks USING hnsw (embedding vector_cosine_ops);
    """)
