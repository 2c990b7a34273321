r"""A transaction's start that nothing left in the session can fail, slow or corrupt (issue 24, items 2, 4, 6).

Until this revision, SQL injected in tenant A's transaction could leave the backend in a state in
which the next transaction's ``rtv.clean_session()`` failed, every time: 100,000 session-level
placeholder settings (``set_config('x.a' || i, 'v', false)``) make its ``RESET ALL`` take about
8 ms, and ``SET SESSION statement_timeout = 1`` cancelled it; the abort put back everything the
reset had undone, so the next transaction met the same state again. The pool kept the connection
(a failure of the start was taken for the caller's own statement's error), and behind PgBouncer in
transaction mode every client got that backend in turn.

Two changes stop it; this revision holds the database's half:

* rtv-db now starts every transaction with ``SET LOCAL statement_timeout = 0`` (and, on
  PostgreSQL 17 and later, ``SET LOCAL transaction_timeout = 0``) and ``SET LOCAL jit = off``,
  pipelined after ``BEGIN`` and before ``SELECT rtv.clean_session()``: a statement's timeout is
  armed when the server starts the statement, with the value in force then, so the clean session
  runs with no timer an earlier transaction planted, and is not planned with JIT settings it
  planted (see rtv_db.tenant._transaction). ``RESET ALL`` then puts the role's own timeouts back.
  A failed start now discards the connection.
* ``rtv.clean_session()`` (below) measures its own work. Planted state that ``RESET ALL`` cannot
  take away (the placeholders stay defined, with their memory: about 350 bytes each, 100 MB for
  300,000, until the backend ends) makes it slow; when it took more than 5 ms (measured: 4 µs
  median and under 0.1 ms at the 99.9th percentile with nothing planted, 8 to 14 ms after 100,000
  placeholders; tests/test_session_start_attacks.py, docs/reliability.md), it
  retires the session: it raises a WARNING with the fixed message ``rtv-db: session retired`` (on
  which rtv-db closes the connection when it goes back to the pool) and sets
  ``idle_session_timeout`` to 61 s at session level, so that a backend behind PgBouncer, which
  rtv-db cannot close, ends itself once it has been idle that long. 61 s is longer than
  PgBouncer's ``server_check_delay`` (30 s by default): a server idle that long is checked with
  ``server_check_query`` before PgBouncer hands it out again, so a backend ending then fails
  PgBouncer's check, not a client's transaction. Every later clean session of a retired backend
  sees the 61 s and sets it again (``RESET ALL`` would otherwise undo it), without a new warning.

Items 4 (what the driver heard: rtv_db._session_guard) and 6 (role settings planted with ``ALTER
ROLE current_user``, put back at connect: rtv_db.connection) need no database change. Downgrade puts
revision 0005's function back.

Everything the function calls is schema-qualified: a ``search_path`` planted for the session
changes nothing before ``RESET ALL`` (the runtime role can create no object anywhere, so no
operator or type name can be hijacked either).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from rtv_db.migrations._sql import run

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run(r"""
    -- SECURITY INVOKER and no SET clause, as in revision 0005: it resets the caller's own session,
    -- and a SET clause would put its own variable back at exit.
    CREATE OR REPLACE FUNCTION rtv.clean_session() RETURNS void
        LANGUAGE plpgsql VOLATILE
    AS $$
    DECLARE
        -- Read before RESET ALL: an earlier clean session of this backend retired it.
        retired constant boolean := pg_catalog.current_setting('idle_session_timeout') = '61s';
        started constant timestamptz := pg_catalog.clock_timestamp();
        took    interval;
    BEGIN
        RESET ALL;               -- settings back to the role's defaults (search_path, timeouts, ...)
        EXECUTE 'CLOSE ALL';     -- cursors WITH HOLD of earlier transactions
        EXECUTE 'DEALLOCATE ALL';-- prepared statements (rtv-db prepares none; SQL may have)
        UNLISTEN *;
        DISCARD SEQUENCES;       -- currval()/lastval() of earlier transactions
        took := pg_catalog.clock_timestamp() - started;
        IF retired OR took > interval '5 milliseconds' THEN
            -- Session level, committed with the transaction: the backend ends after 61 s idle.
            PERFORM pg_catalog.set_config('idle_session_timeout', '61s', false);
            IF NOT retired THEN
                RAISE WARNING 'rtv-db: session retired'
                    USING DETAIL = pg_catalog.format(
                        'Its clean-up took %s ms: an earlier transaction planted state on this backend.',
                        pg_catalog.round((pg_catalog.date_part('epoch', took) * 1000)::numeric, 1)),
                          HINT = 'rtv-db closes the connection when it returns to the pool; '
                                 'behind a pooler the backend ends after 61 s idle.';
            END IF;
        END IF;
    END
    $$;
    """)


# Revision 0005's function, as it was (what downgrade puts back).
CLEAN_SESSION_0005 = r"""
    CREATE OR REPLACE FUNCTION rtv.clean_session() RETURNS void
        LANGUAGE plpgsql VOLATILE
    AS $$
    BEGIN
        RESET ALL;               -- settings back to the role's defaults (search_path, timeouts, ...)
        EXECUTE 'CLOSE ALL';     -- cursors WITH HOLD of earlier transactions
        EXECUTE 'DEALLOCATE ALL';-- prepared statements (rtv-db prepares none; SQL may have)
        UNLISTEN *;
        DISCARD SEQUENCES;       -- currval()/lastval() of earlier transactions
    END
    $$;
"""


def downgrade() -> None:
    run(CLEAN_SESSION_0005)
