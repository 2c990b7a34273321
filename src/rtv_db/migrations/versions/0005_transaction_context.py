r"""A clean session for every transaction, and a tenant context bound to the transaction (issue 11).

Until this revision a pooled connection kept whatever an earlier transaction left in its session
(prepared statements, settings, cursors, LISTENs), and the signed token was bound to the backend
(``pg_backend_pid()``): SQL injected in tenant A's transaction could plant a prepared statement
that tenant B's next transaction on the same backend ran, read B's token back, and replay it.
Behind PgBouncer's transaction pooling the backend is not the client's to know, so the signed
mode did not work there at all.

From here on:

* ``rtv.clean_session()`` is the first statement of every transaction rtv-db starts (pipelined
  with ``BEGIN``): it resets every setting to the role's defaults, closes cursors, drops every
  prepared statement, unlistens and forgets sequence values. Whatever an earlier transaction
  planted on the backend, directly or behind a pooler, the next one starts clean.
* The token (``v2.<key>.<tenant>.<account|->.<lane>.<expiry>.<nonce>.<mac>``) names no backend.
  ``rtv.set_signed_context`` (SECURITY DEFINER) verifies it and *spends* it: it inserts the
  token's nonce, with the verified claims and audit labels, into
  ``rtv_secret.transaction_contexts``, keyed by this transaction's id. A nonce is spent once: the
  same token in any later transaction is refused as replayed, and a second context in a
  transaction that already has one is refused. The readers the policies call
  (``rtv.current_tenant_id()`` ...) read the row of *this* transaction id, which no SQL on the
  runtime role can write or forge; settings such as ``app.tenant_token`` are no longer trusted
  at all in signed mode.
* The audit labels (``rtv.current_user_id()``, ``rtv.current_correlation_id()``) come from the same
  verified row, never from plain settings a statement can change before a trigger fires.

The table is UNLOGGED: spending a token writes no WAL, so a read-only tenant transaction does not
wait for a WAL flush at commit. After a server crash the table is empty, and a token minted
before the crash could be spent once more until it expires (``RTV_DB_CONTEXT_TTL``). A rollback
takes the row with it: rtv-db then records the nonce again with ``rtv.spend_rolled_back_token``,
sent with the ROLLBACK; only a transaction whose connection is lost before it ends leaves its
token unrecorded. See docs/signed-context.md.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from rtv_db.migrations._sql import run

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run(r"""
    -- The clean session ----------------------------------------------------------------------

    -- What DISCARD ALL does, minus what cannot happen on the runtime role (temporary objects:
    -- TEMP is revoked; SET SESSION AUTHORIZATION: superusers only) and minus DISCARD PLANS,
    -- which would throw away the plans of the context functions on every transaction (measured:
    -- DISCARD ALL doubled a point read) and changes no result. DISCARD ALL itself cannot run in
    -- a transaction block, and behind PgBouncer's transaction pooling only statements inside
    -- the transaction are sure to reach the backend the transaction runs on.
    -- SECURITY INVOKER and no SET clause: it resets the caller's own session, and a SET clause
    -- would put its own variable back at exit.
    CREATE FUNCTION rtv.clean_session() RETURNS void
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
    REVOKE ALL ON FUNCTION rtv.clean_session() FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION rtv.clean_session() TO @runtime@, @system@;

    -- The transaction's context ----------------------------------------------------------------

    -- One row per spent token. nonce: spent once, ever (until the row expires with the token).
    -- xact: the transaction that spent it; the readers look up the current transaction's id.
    CREATE UNLOGGED TABLE rtv_secret.transaction_contexts (
        nonce               text   NOT NULL,
        xact                xid8   NOT NULL,
        tenant_id           uuid   NOT NULL,
        platform_account_id uuid,
        lane                text,
        user_id             text,
        correlation_id      text,
        expires_at          bigint NOT NULL,
        CONSTRAINT transaction_contexts_pkey PRIMARY KEY (nonce)
    );
    CREATE INDEX transaction_contexts_xact_idx ON rtv_secret.transaction_contexts (xact);
    REVOKE ALL ON rtv_secret.transaction_contexts FROM PUBLIC;

    -- What a verified token claims, or why it was refused (refusal NULL: accepted).
    CREATE TYPE rtv_secret.token_claims AS (
        tenant_id           uuid,
        platform_account_id uuid,
        lane                text,
        nonce               text,
        expires_at          bigint,
        refusal             text
    );

    -- The context of the current transaction (all NULL: none).
    CREATE TYPE rtv_secret.transaction_context AS (
        tenant_id           uuid,
        platform_account_id uuid,
        lane                text,
        user_id             text,
        correlation_id      text
    );

    -- Verify one v2 token. Fields are read only after the MAC: a token with a valid MAC was
    -- minted by a key holder, so its fields are well formed; before that nothing is cast.
    -- (No DROP of the readers that call the functions replaced here: SQL function bodies are
    -- not dependencies, so the policies that call the readers stay as they are.)
    DROP FUNCTION rtv_secret.verified_context();
    DROP FUNCTION rtv_secret.verify_token(text, text, text);
    DROP TYPE rtv_secret.context_claims;

    CREATE FUNCTION rtv_secret.verify_token(token text, user_id text, correlation_id text)
        RETURNS rtv_secret.token_claims
        LANGUAGE plpgsql STABLE PARALLEL RESTRICTED
    AS $$
    DECLARE
        parts  text[];
        pads   record;
        result rtv_secret.token_claims;
    BEGIN
        IF token IS NULL OR token = '' THEN
            result.refusal := 'no token';
            RETURN result;
        END IF;
        IF length(token) > 256 THEN
            result.refusal := 'malformed';
            RETURN result;
        END IF;
        parts := string_to_array(token, '.');
        IF cardinality(parts) <> 8 OR parts[1] <> 'v2' OR length(parts[8]) <> 64 OR length(parts[7]) <> 32 THEN
            result.refusal := 'malformed';
            RETURN result;
        END IF;
        SELECT k.inner_pad, k.outer_pad INTO pads
        FROM rtv_secret.context_keys k WHERE k.key_id = parts[2];
        IF NOT FOUND THEN
            result.refusal := 'unknown or retired key';
            RETURN result;
        END IF;
        -- HMAC-SHA256 = H((K xor opad) || H((K xor ipad) || message))
        IF encode(sha256(pads.outer_pad || sha256(pads.inner_pad || convert_to(
                left(token, -65) || E'\n' || COALESCE(user_id, '') || E'\n' || COALESCE(correlation_id, ''),
                'UTF8'))), 'hex') <> parts[8] THEN
            result.refusal := 'bad signature';
            RETURN result;
        END IF;
        -- now() is the transaction's start: the token must be valid when the transaction began.
        IF parts[6]::bigint <= extract(epoch FROM now()) THEN
            result.refusal := 'expired';
            RETURN result;
        END IF;
        result.tenant_id := parts[3]::uuid;
        result.platform_account_id := CASE WHEN parts[4] <> '-' THEN parts[4]::uuid END;
        result.lane := CASE WHEN parts[5] IN ('api', 'browser') THEN parts[5] END;
        result.nonce := parts[7];
        result.expires_at := parts[6]::bigint;
        RETURN result;
    END
    $$;

    -- The context of this transaction: the row its rtv.set_signed_context spent, or in unsigned
    -- mode (debugging only) the plain settings. Nothing else: a token or id placed in a setting
    -- by SQL is not looked at in signed mode.
    CREATE FUNCTION rtv_secret.verified_context() RETURNS rtv_secret.transaction_context
        LANGUAGE plpgsql STABLE PARALLEL RESTRICTED
    AS $$
    DECLARE
        result rtv_secret.transaction_context;
        lane   text;
    BEGIN
        SELECT c.tenant_id, c.platform_account_id, c.lane, c.user_id, c.correlation_id INTO result
        FROM rtv_secret.transaction_contexts c
        WHERE c.xact = pg_current_xact_id_if_assigned();
        IF FOUND THEN
            RETURN result;
        END IF;
        IF (SELECT s.mode FROM rtv_secret.context_settings s) = 'unsigned' THEN
            result.tenant_id := rtv.to_uuid_or_null(current_setting('app.current_tenant_id', true));
            IF result.tenant_id IS NOT NULL THEN
                result.platform_account_id :=
                    rtv.to_uuid_or_null(current_setting('app.current_platform_account_id', true));
                lane := current_setting('app.current_lane', true);
                result.lane := CASE WHEN lane IN ('api', 'browser') THEN lane END;
                result.user_id := NULLIF(current_setting('app.current_user_id', true), '');
                result.correlation_id := NULLIF(current_setting('app.correlation_id', true), '');
            END IF;
        END IF;
        RETURN result;
    END
    $$;

    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA rtv_secret FROM PUBLIC;

    -- The readers the policies and the audit trigger call: same names and signatures as before.

    CREATE OR REPLACE FUNCTION rtv.current_tenant_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT c.tenant_id FROM rtv_secret.verified_context() c $$;

    CREATE OR REPLACE FUNCTION rtv.current_platform_account_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT c.platform_account_id FROM rtv_secret.verified_context() c $$;

    CREATE OR REPLACE FUNCTION rtv.current_lane() RETURNS text
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT c.lane FROM rtv_secret.verified_context() c $$;

    -- The audit labels: signed with the token, stored with the spent row. (Before this revision
    -- they were read from plain settings, which a statement could change between its INSERT and
    -- the AFTER ROW trigger that records the event.)
    CREATE OR REPLACE FUNCTION rtv.current_user_id() RETURNS text
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT c.user_id FROM rtv_secret.verified_context() c $$;

    CREATE OR REPLACE FUNCTION rtv.current_correlation_id() RETURNS text
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT c.correlation_id FROM rtv_secret.verified_context() c $$;

    -- NULL when the transaction's context (if any) is a verified one; otherwise why not. Kept
    -- for callers of revision 0004: refusals now happen in rtv.set_signed_context, loudly.
    CREATE OR REPLACE FUNCTION rtv.context_refusal() RETURNS text
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT CASE
            WHEN c.tenant_id IS NULL AND COALESCE(current_setting('app.tenant_token', true), '') <> ''
            THEN 'not set by rtv.set_signed_context in this transaction'
        END
        FROM rtv_secret.verified_context() c
    $$;

    -- Setting the context ----------------------------------------------------------------------

    -- Verify the token, spend its nonce for this transaction, or refuse loudly (and log it).
    -- SECURITY DEFINER (the owner writes rtv_secret) with a fixed search_path; it sets no
    -- setting, so the SET clause takes nothing away. Spent rows expire with their tokens; one
    -- call in 256 (by the nonce, which only a key holder chooses) deletes a batch of expired
    -- ones, skipping rows other transactions hold (a tenant's open transaction never makes
    -- another tenant's BEGIN wait).
    CREATE OR REPLACE FUNCTION rtv.set_signed_context(
        token text,
        user_id text DEFAULT NULL,
        correlation_id text DEFAULT NULL
    ) RETURNS void
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        claims  rtv_secret.token_claims;
        claimed text;
    BEGIN
        IF token IS NULL OR token = '' THEN
            RAISE EXCEPTION 'rtv.set_signed_context: a token is required'
                USING ERRCODE = 'null_value_not_allowed';
        END IF;
        IF EXISTS (SELECT FROM rtv_secret.transaction_contexts c
                   WHERE c.xact = pg_current_xact_id_if_assigned()) THEN
            claims.refusal := 'this transaction already has a tenant context';
        ELSE
            claims := rtv_secret.verify_token(token, user_id, correlation_id);
        END IF;
        IF claims.refusal IS NULL THEN
            INSERT INTO rtv_secret.transaction_contexts
                (nonce, xact, tenant_id, platform_account_id, lane, user_id, correlation_id, expires_at)
            VALUES
                (claims.nonce, pg_current_xact_id(), claims.tenant_id, claims.platform_account_id,
                 claims.lane, NULLIF(user_id, ''), NULLIF(correlation_id, ''), claims.expires_at)
            ON CONFLICT (nonce) DO NOTHING;
            IF NOT FOUND THEN
                claims.refusal := 'replayed: the token was already used';
            END IF;
        END IF;
        IF claims.refusal IS NOT NULL THEN
            -- What the token claimed, sanitised (it is attacker-controlled text).
            claimed := regexp_replace(left(token, 120), '[^0-9A-Za-z._-]', '?', 'g');
            RAISE LOG 'rtv-db security: tenant context refused (%): role %, backend %, claimed tenant %, token %',
                claims.refusal, session_user, pg_backend_pid(), split_part(claimed, '.', 3), left(claimed, 60);
            RAISE EXCEPTION 'rtv.set_signed_context: tenant context refused: %', claims.refusal
                USING ERRCODE = 'invalid_authorization_specification',
                      HINT = 'check the context key (rtv-db key list) and the clocks; see docs/signed-context.md';
        END IF;
        IF right(claims.nonce, 2) = '00' THEN
            DELETE FROM rtv_secret.transaction_contexts
            WHERE ctid = ANY (ARRAY(
                SELECT e.ctid FROM rtv_secret.transaction_contexts e
                WHERE e.expires_at < extract(epoch FROM now()) - 60
                LIMIT 5000 FOR UPDATE SKIP LOCKED));
        END IF;
    END
    $$;

    -- A token whose transaction rolled back took its row with it. rtv-db calls this right after
    -- the ROLLBACK, in the same round trip, outside any transaction block: the nonce is recorded
    -- as spent (by no transaction) so the token cannot be used again. Only a token with a valid
    -- MAC is recorded, so the table cannot be filled with junk.
    CREATE FUNCTION rtv.spend_rolled_back_token(
        token text,
        user_id text DEFAULT NULL,
        correlation_id text DEFAULT NULL
    ) RETURNS void
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        claims rtv_secret.token_claims := rtv_secret.verify_token(token, user_id, correlation_id);
    BEGIN
        IF claims.refusal IS NULL THEN
            INSERT INTO rtv_secret.transaction_contexts (nonce, xact, tenant_id, expires_at)
            VALUES (claims.nonce, '0'::xid8, claims.tenant_id, claims.expires_at)
            ON CONFLICT (nonce) DO NOTHING;
        END IF;
    END
    $$;

    -- Ending the context for the rest of the transaction (rtv_db.clear_tenant_context). The
    -- nonce stays spent: the row is detached from the transaction, not deleted.
    CREATE FUNCTION rtv.release_signed_context() RETURNS void
        LANGUAGE sql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
        UPDATE rtv_secret.transaction_contexts SET xact = '0'::xid8
        WHERE xact = pg_current_xact_id_if_assigned()
    $$;

    CREATE OR REPLACE FUNCTION rtv.clear_tenant_context() RETURNS void
        LANGUAGE plpgsql VOLATILE
    AS $$
    BEGIN
        PERFORM rtv.release_signed_context();
        SET LOCAL app.tenant_token = '';
        SET LOCAL app.current_tenant_id = '';
        SET LOCAL app.current_platform_account_id = '';
        SET LOCAL app.current_lane = '';
        SET LOCAL app.current_user_id = '';
        SET LOCAL app.correlation_id = '';
    END
    $$;

    REVOKE ALL ON FUNCTION rtv.set_signed_context(text, text, text), rtv.current_tenant_id(),
        rtv.current_platform_account_id(), rtv.current_lane(), rtv.current_user_id(),
        rtv.current_correlation_id(), rtv.context_refusal(), rtv.release_signed_context(),
        rtv.spend_rolled_back_token(text, text, text) FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION rtv.set_signed_context(text, text, text), rtv.current_tenant_id(),
        rtv.current_platform_account_id(), rtv.current_lane(), rtv.current_user_id(),
        rtv.current_correlation_id(), rtv.context_refusal(), rtv.release_signed_context(),
        rtv.spend_rolled_back_token(text, text, text) TO @runtime@, @system@;
    """)


def _revision_0004():  # noqa: ANN202
    """Revision 0004's module (its file name is not an importable module name)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("rtv_db_revision_0004", Path(__file__).with_name("0004_signed_context.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def downgrade() -> None:
    # Back to 0004: through 0004's own downgrade and upgrade, keeping the installed keys and mode.
    run(r"""
    DROP FUNCTION rtv.clean_session();
    DROP FUNCTION rtv.release_signed_context();
    DROP FUNCTION rtv.spend_rolled_back_token(text, text, text);
    -- (Not TEMPORARY: TEMP is revoked in this database, for the owner too.)
    CREATE TABLE rtv.kept_context_keys AS SELECT key_id, secret, created_at FROM rtv_secret.context_keys;
    CREATE TABLE rtv.kept_context_mode AS SELECT mode FROM rtv_secret.context_settings;
    -- 0002's plain label readers (0004 left them so).
    CREATE OR REPLACE FUNCTION rtv.current_user_id() RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
    AS $$ SELECT NULLIF(current_setting('app.current_user_id', true), '') $$;
    CREATE OR REPLACE FUNCTION rtv.current_correlation_id() RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
    AS $$ SELECT NULLIF(current_setting('app.correlation_id', true), '') $$;
    ALTER FUNCTION rtv.current_user_id() RESET ALL;
    ALTER FUNCTION rtv.current_correlation_id() RESET ALL;
    """)
    revision_0004 = _revision_0004()
    revision_0004.downgrade()
    revision_0004.upgrade()
    run(r"""
    INSERT INTO rtv_secret.context_keys (key_id, secret, created_at)
        SELECT key_id, secret, created_at FROM rtv.kept_context_keys;
    UPDATE rtv_secret.context_settings SET mode = (SELECT mode FROM rtv.kept_context_mode);
    DROP TABLE rtv.kept_context_keys, rtv.kept_context_mode;
    """)
