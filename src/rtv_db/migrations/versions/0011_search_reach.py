r"""Per-tenant search indexes that no other tenant can walk (issue 24, item 8).

Until this revision a large tenant's HNSW index was partial on ``WHERE search_key = <key>``.
The predicate is in the catalog, which every role reads, and the runtime role could name
``search_key``. So SQL injected in tenant B's transaction could write ``SELECT id FROM
knowledge_chunks WHERE search_key = <A's key> ORDER BY embedding <=> :q LIMIT 10``: the planner
proves the index's predicate from it and walks A's index, the policy's filter drops every row
of A's, and ``EXPLAIN ANALYZE`` reports how many it dropped (``Rows Removed by Filter``), which
is A's live row count, in real time (66, then 69 after A added 3).

From here on:

* The index is partial on ``WHERE rtv_secret.search_partition(search_key) = <key>``.
  ``search_partition`` is an identity function in PL/pgSQL (never inlined: an SQL function would
  be inlined when the planner loads the predicate, and ``search_key = <key>`` would match it
  again, tests/test_search_reach_attacks.py). The runtime role has no USAGE on ``rtv_secret``:
  it cannot name the function, so it cannot write the predicate, so no statement of its can
  make the planner walk a per-tenant index. Evaluating the predicate needs EXECUTE only (every
  insert into ``knowledge_chunks`` evaluates every partial index's predicate), so EXECUTE is
  granted to the two roles that write the table.
* A tenant walks its own index through ``rtv.search_own_index(q, k, knowledge_base,
  with_embedding)`` (the query vector in pgvector's text form), SECURITY DEFINER (the owner may
  name the function). It reads the current tenant from the
  verified context and its key from ``rtv_secret.search_indexes`` (state ``ready``), never from
  an argument, and runs the walk with that key as a literal, so the planner matches the partial
  index. ``knowledge_chunks`` has FORCE ROW LEVEL SECURITY (revision 0002), so the policy still
  applies to the owner inside it; the statement also names ``client_id = <tenant>`` itself.
  Fixed search_path, qualified names. It sets ``enable_sort = off``, ``hnsw.iterative_scan =
  relaxed_order`` and ``hnsw.ef_search = max(k, 400)`` for its own duration (SET clauses: the
  caller's settings are back when it returns). No key ready: no rows (the caller then searches
  exactly). ``EXPLAIN`` of a call shows a function scan, not the walk.
* Indexes of the old form (``search_key = <key>``) are dropped here and their tenants' state set
  to ``dropped``: their searches are exact until ``rtv-db search index --min-chunks N`` (or
  ``--tenant``) builds them again in the new form. A migration cannot build them ``CONCURRENTLY``
  (it runs in a transaction), and a plain build would block every writer of the table for the
  length of the build.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from rtv_db.migrations._sql import run

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run(r"""
    -- Old-form per-tenant indexes: any tenant could walk them. Dropped, and their tenants'
    -- searches exact until the index is built again (docs/search.md).
    DO $drop$
    DECLARE
        idx record;
    BEGIN
        FOR idx IN
            SELECT c.relname, substring(pg_get_expr(i.indpred, i.indrelid) FROM '^\(search_key = (\d+)\)$')::integer AS key
            FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = 'public.knowledge_chunks'::regclass
              AND pg_get_expr(i.indpred, i.indrelid) ~ '^\(search_key = \d+\)$'
        LOOP
            EXECUTE format('DROP INDEX public.%I', idx.relname);
            UPDATE rtv_secret.search_indexes SET state = 'dropped', changed_at = now()
            WHERE search_key = idx.key AND state <> 'dropped';
            RAISE WARNING 'rtv-db: dropped % (any tenant could walk it); rebuild it with `rtv-db search index`', idx.relname;
        END LOOP;
    END
    $drop$;

    -- The predicate of every per-tenant index. PL/pgSQL so that it is never inlined (an inlined
    -- identity would turn the predicate back into search_key = <key> for whoever plans).
    -- No SET clause: it is called for every partial index on every write of the table.
    CREATE FUNCTION rtv_secret.search_partition(key integer) RETURNS integer
        LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
    BEGIN
        RETURN key;
    END
    $$;
    REVOKE ALL ON FUNCTION rtv_secret.search_partition(integer) FROM PUBLIC;
    -- Writers evaluate the predicates (EXECUTE is checked by oid); without USAGE on rtv_secret
    -- they cannot name the function in a statement of their own.
    GRANT EXECUTE ON FUNCTION rtv_secret.search_partition(integer) TO @runtime@, @system@;

    -- The SET clauses below name pgvector's settings: they are validated as pgvector defines
    -- them, which it does once its library is loaded in this session (the cast loads it).
    SELECT '[1]'::public.vector;

    -- The tenant's own search on its own index, and the only way to walk one.
    -- Its signature and result name pg_catalog's types only (the query vector comes in, and an
    -- embedding goes out, in pgvector's text form): they read the same whatever the reader's
    -- search_path, as verify's manifest compares them.
    CREATE FUNCTION rtv.search_own_index(q text, k integer, knowledge_base uuid, with_embedding boolean)
        RETURNS TABLE (id uuid, knowledge_base_id uuid, content text, metadata jsonb,
                       embedding text, distance double precision)
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        SET enable_sort = off
        SET hnsw.iterative_scan = relaxed_order
        SET hnsw.ef_search = 400
    AS $fn$
    DECLARE
        tenant uuid := rtv.current_tenant_id();
        query  public.vector;
        key    integer;
    BEGIN
        IF k IS NULL OR k < 1 OR k > 1000 THEN
            RAISE EXCEPTION 'k must be an integer from 1 to 1000' USING ERRCODE = '22023';
        END IF;
        IF tenant IS NULL OR q IS NULL THEN
            RETURN;
        END IF;
        SELECT s.search_key INTO key FROM rtv_secret.search_indexes s
        WHERE s.tenant_id = tenant AND s.state = 'ready';
        IF key IS NULL THEN
            RETURN;  -- no index ready: the caller searches exactly
        END IF;
        query := q::public.vector;
        IF k > 400 THEN  -- the candidate list holds at least k (pgvector's ceiling is 1000)
            PERFORM set_config('hnsw.ef_search', k::text, true);
        END IF;
        -- The key as a literal: the planner proves the partial index's predicate from it.
        -- enable_sort is off: the planner would rather sort a few thousand rows than walk the
        -- index, and its costs depend on estimates; off, the walk is chosen whatever they are.
        RETURN QUERY EXECUTE format(
            'SELECT c.id, c.knowledge_base_id, c.content, c.metadata,'
            '       CASE WHEN $4 THEN c.embedding::text END, c.embedding OPERATOR(public.<=>) $2'
            '  FROM public.knowledge_chunks c'
            ' WHERE c.client_id = $1 AND rtv_secret.search_partition(c.search_key) = %s%s'
            '   AND c.embedding IS NOT NULL'
            ' ORDER BY c.embedding OPERATOR(public.<=>) $2'
            ' LIMIT $5',
            key, CASE WHEN knowledge_base IS NOT NULL THEN ' AND c.knowledge_base_id = $3' ELSE '' END)
        USING tenant, query, knowledge_base, with_embedding, k;
    END
    $fn$;
    REVOKE ALL ON FUNCTION rtv.search_own_index(text, integer, uuid, boolean) FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION rtv.search_own_index(text, integer, uuid, boolean) TO @runtime@;
    """)


def downgrade() -> None:
    # New-form indexes go with the function their predicate calls; their tenants' searches are
    # exact until `rtv-db search index` (of revision 0007..0010) builds them in the old form.
    run(r"""
    DO $drop$
    DECLARE
        idx record;
    BEGIN
        FOR idx IN
            SELECT c.relname,
                   substring(pg_get_expr(i.indpred, i.indrelid)
                             FROM '^\((?:rtv_secret\.)?search_partition\(search_key\) = (\d+)\)$')::integer AS key
            FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = 'public.knowledge_chunks'::regclass
              AND pg_get_expr(i.indpred, i.indrelid) ~ '^\((rtv_secret\.)?search_partition\(search_key\) = \d+\)$'
        LOOP
            EXECUTE format('DROP INDEX public.%I', idx.relname);
            UPDATE rtv_secret.search_indexes SET state = 'dropped', changed_at = now()
            WHERE search_key = idx.key AND state <> 'dropped';
        END LOOP;
    END
    $drop$;
    DROP FUNCTION rtv.search_own_index(text, integer, uuid, boolean);
    DROP FUNCTION rtv_secret.search_partition(integer);
    """)
