r"""The watchdog knows which tenant stalls, and a repeat staller is refused for good (issue 24, items 3, 5).

Until this revision ``rtv-db watchdog`` could not tell which tenant a runtime-role backend served:
the transaction's context row (revision 0005) is uncommitted, invisible to every other session,
and the runtime role's sessions carry nothing else. So it could only end backends, never the
tenant behind them: a tenant ended three times came back a fourth.

From here on:

* ``rtv.set_signed_context`` (0005's body, plus what is marked below) *marks* the transaction
  once the token is verified and spent: two shared transaction-level advisory locks whose keys
  are the tenant id (128 bits) XOR a pad, ``sha256(secret || xid)`` of a random secret kept in
  ``rtv_secret.stall_settings`` and of the transaction's id (as ``pg_stat_activity.backend_xid``
  shows it). ``pg_locks`` shows the two keys to the watchdog, which decrypts them with
  ``rtv.watchdog_tenant(k1, k2, xid)``. The runtime role cannot take advisory locks (the bootstrap
  revokes them), so it cannot wear another tenant's mark; it can read ``pg_locks``, where each
  transaction's keys look random: the pad changes with every transaction, so the marks link no
  two transactions and name no tenant. The locks are shared: they never make anyone wait.
  They end with the transaction (an injected ``COMMIT`` ends the mark with it: a transaction
  without a context is judged by the watchdog's rules but counted against no tenant).
* ``rtv_secret.stall_quarantine``: tenants refused for good. ``rtv.set_signed_context`` refuses a
  quarantined tenant's context (``invalid_authorization_specification``, as any refusal:
  ``TenantContextRefusedError`` on the client) until an operator releases it.
* ``rtv.watchdog_record_termination(tenant, reason, quarantine_after, window_ms)``: the watchdog
  records each termination it counts against a tenant (``rtv_secret.stall_terminations``); the
  ``quarantine_after``-th within ``window_ms`` quarantines the tenant.
  ``rtv.watchdog_release(tenant)`` and ``rtv.watchdog_quarantined()`` are the operator's
  (``rtv-db watchdog release`` / ``quarantined``).

The four ``rtv.watchdog_*`` functions are SECURITY DEFINER (the owner reads and writes
``rtv_secret``) with EXECUTE for nobody: the admin login (a superuser) needs no grant, a dedicated
watchdog role gets it by hand (docs/watchdog.md). The owner needs EXECUTE on the two
``pg_advisory_xact_lock_shared`` functions, which the bootstrap gives back to it alone.

On Citus (unsigned mode only) ``rtv.set_signed_context`` is never called: there are no marks and
no quarantine, and the watchdog's rules apply without them (docs/watchdog.md).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

from rtv_db.migrations._sql import run

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run(r"""
    -- The pad's secret: random (gen_random_uuid() draws from the server's strong random source),
    -- made here, never shown, never changed (a new one would only unlink running transactions).
    CREATE TABLE rtv_secret.stall_settings (
        singleton boolean NOT NULL DEFAULT true,
        secret    bytea   NOT NULL,
        CONSTRAINT stall_settings_pkey PRIMARY KEY (singleton),
        CONSTRAINT stall_settings_singleton_check CHECK (singleton),
        CONSTRAINT stall_settings_secret_check CHECK (length(secret) = 32)
    );
    REVOKE ALL ON rtv_secret.stall_settings FROM PUBLIC;
    INSERT INTO rtv_secret.stall_settings (secret)
    VALUES (sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')));

    -- Terminations the watchdog counted against a tenant, within its window (older rows are
    -- deleted by the next record).
    CREATE TABLE rtv_secret.stall_terminations (
        tenant_id     uuid        NOT NULL,
        terminated_at timestamptz NOT NULL,
        reason        text        NOT NULL
    );
    CREATE INDEX stall_terminations_tenant_idx ON rtv_secret.stall_terminations (tenant_id, terminated_at);
    REVOKE ALL ON rtv_secret.stall_terminations FROM PUBLIC;

    -- Tenants whose context rtv.set_signed_context refuses until an operator releases them.
    CREATE TABLE rtv_secret.stall_quarantine (
        tenant_id    uuid        NOT NULL,
        since        timestamptz NOT NULL,
        reason       text        NOT NULL,
        terminations integer     NOT NULL,
        CONSTRAINT stall_quarantine_pkey PRIMARY KEY (tenant_id)
    );
    REVOKE ALL ON rtv_secret.stall_quarantine FROM PUBLIC;

    -- 0005's setter, plus: a quarantined tenant is refused (after the token's checks, so that a
    -- forged token is refused as forged), and a spent context marks the transaction.
    CREATE OR REPLACE FUNCTION rtv.set_signed_context(
        token text,
        user_id text DEFAULT NULL,
        correlation_id text DEFAULT NULL
    ) RETURNS void
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        claims      rtv_secret.token_claims;
        claimed     text;
        secret      bytea;
        quarantined boolean;
        mark        bit(128);
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
            -- (0010) One query for the pad's secret and the quarantine.
            SELECT s.secret, EXISTS (SELECT FROM rtv_secret.stall_quarantine q WHERE q.tenant_id = claims.tenant_id)
            INTO secret, quarantined
            FROM rtv_secret.stall_settings s;
            IF quarantined THEN
                claims.refusal := 'the tenant is quarantined by the watchdog for repeated stalls';
            END IF;
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
                      HINT = CASE WHEN quarantined
                                  THEN 'an operator releases it: rtv-db watchdog release <tenant>; see docs/watchdog.md'
                                  ELSE 'check the context key (rtv-db key list) and the clocks; see docs/signed-context.md'
                             END;
        END IF;
        -- (0010) The mark: the tenant id XOR sha256(secret || xid), as two shared advisory locks
        -- (one bigint key, one pair of integers: pg_locks tells them apart by objsubid 1 and 2).
        -- The xid is the transaction's id as pg_stat_activity.backend_xid shows it (32 bits).
        mark := ('x' || encode(uuid_send(claims.tenant_id), 'hex'))::bit(128)
              # ('x' || encode(substr(sha256(secret || int8send(pg_current_xact_id()::text::bigint % 4294967296)), 1, 16),
                               'hex'))::bit(128);
        PERFORM pg_advisory_xact_lock_shared(substring(mark FROM 1 FOR 64)::bigint),
                pg_advisory_xact_lock_shared(substring(mark FROM 65 FOR 32)::integer,
                                             substring(mark FROM 97 FOR 32)::integer);
        IF right(claims.nonce, 2) = '00' THEN
            DELETE FROM rtv_secret.transaction_contexts
            WHERE ctid = ANY (ARRAY(
                SELECT e.ctid FROM rtv_secret.transaction_contexts e
                WHERE e.expires_at < extract(epoch FROM now()) - 60
                LIMIT 5000 FOR UPDATE SKIP LOCKED));
        END IF;
    END
    $$;

    -- The watchdog's functions: EXECUTE for nobody (the admin login is a superuser; a dedicated
    -- watchdog role is granted them by hand, docs/watchdog.md). Fixed search_path.

    -- The tenant a transaction's mark names: k1 (pg_locks objsubid 1), k2 (objsubid 2, the two
    -- integers as one bigint) and the transaction's xid. NULL when any is NULL. A mismatched
    -- xid gives a random id, not an error: the caller takes the xid from the same pg_locks row set.
    CREATE FUNCTION rtv.watchdog_tenant(k1 bigint, k2 bigint, xact xid) RETURNS uuid
        LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT (lpad(to_hex(substring(m FROM 1 FOR 64)::bigint), 16, '0')
                || lpad(to_hex(substring(m FROM 65 FOR 64)::bigint), 16, '0'))::uuid
        FROM (SELECT (k1::bit(64) || k2::bit(64))
                     # ('x' || encode(substr(sha256(s.secret || int8send(xact::text::bigint)), 1, 16), 'hex'))::bit(128) AS m
              FROM rtv_secret.stall_settings s) p
    $$;

    -- Record one termination counted against a tenant; quarantine it at the quarantine_after-th
    -- within window_ms (quarantine_after 0: never). True when this call quarantined it.
    CREATE FUNCTION rtv.watchdog_record_termination(tenant uuid, reason text, quarantine_after integer,
                                                     window_ms bigint) RETURNS boolean
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        counted integer;
    BEGIN
        IF tenant IS NULL OR reason IS NULL OR quarantine_after IS NULL OR quarantine_after < 0
           OR window_ms IS NULL OR window_ms <= 0 THEN
            RAISE EXCEPTION 'rtv.watchdog_record_termination: a tenant, a reason, quarantine_after >= 0 and window_ms > 0 are required'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        DELETE FROM rtv_secret.stall_terminations t
        WHERE t.terminated_at < clock_timestamp() - make_interval(secs => window_ms / 1000.0);
        INSERT INTO rtv_secret.stall_terminations (tenant_id, terminated_at, reason)
        VALUES (tenant, clock_timestamp(), left(reason, 200));
        IF quarantine_after = 0 THEN
            RETURN false;
        END IF;
        SELECT count(*) INTO counted FROM rtv_secret.stall_terminations t WHERE t.tenant_id = tenant;
        IF counted < quarantine_after THEN
            RETURN false;
        END IF;
        INSERT INTO rtv_secret.stall_quarantine (tenant_id, since, reason, terminations)
        VALUES (tenant, clock_timestamp(), left(reason, 200), counted)
        ON CONFLICT (tenant_id) DO NOTHING;
        RETURN FOUND;
    END
    $$;

    -- Release a quarantined tenant (and forget its counted terminations). True when it was quarantined.
    CREATE FUNCTION rtv.watchdog_release(tenant uuid) RETURNS boolean
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        released boolean;
    BEGIN
        DELETE FROM rtv_secret.stall_quarantine q WHERE q.tenant_id = tenant;
        released := FOUND;
        DELETE FROM rtv_secret.stall_terminations t WHERE t.tenant_id = tenant;
        RETURN released;
    END
    $$;

    CREATE FUNCTION rtv.watchdog_quarantined()
        RETURNS TABLE (tenant_id uuid, since timestamptz, reason text, terminations integer)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT q.tenant_id, q.since, q.reason, q.terminations FROM rtv_secret.stall_quarantine q ORDER BY q.since, q.tenant_id $$;

    REVOKE ALL ON FUNCTION rtv.watchdog_tenant(bigint, bigint, xid),
        rtv.watchdog_record_termination(uuid, text, integer, bigint), rtv.watchdog_release(uuid),
        rtv.watchdog_quarantined() FROM PUBLIC;
    """)


def downgrade() -> None:
    # 0005's setter, verbatim (revisions 0006-0009 left it so).
    run(r"""
    DROP FUNCTION rtv.watchdog_quarantined();
    DROP FUNCTION rtv.watchdog_release(uuid);
    DROP FUNCTION rtv.watchdog_record_termination(uuid, text, integer, bigint);
    DROP FUNCTION rtv.watchdog_tenant(bigint, bigint, xid);

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

    DROP TABLE rtv_secret.stall_quarantine;
    DROP TABLE rtv_secret.stall_terminations;
    DROP TABLE rtv_secret.stall_settings;
    """)
