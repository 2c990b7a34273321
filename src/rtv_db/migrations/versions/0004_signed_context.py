r"""Signed tenant context (issue 8): a context that SQL injected on the runtime role cannot forge.

Until this revision the policies trusted three plain settings (``app.current_tenant_id`` ...),
which any SQL on the runtime role can change with ``SET LOCAL``. From here on the application
sets one setting, ``app.tenant_token``: ``v1.<key>.<tenant>.<account|->.<lane>.<expiry>.<pid>``
followed by ``.<hex HMAC-SHA256>``. The MAC covers those fields plus the ``app.current_user_id``
and ``app.correlation_id`` labels (so tampering with an audit label voids the whole context).

The readers the policies call (``rtv.current_tenant_id()``, ``rtv.current_platform_account_id()``,
``rtv.current_lane()``) keep their names and signatures and become SECURITY DEFINER functions
of the owner with a fixed ``search_path``. They verify the token against a key in
``rtv_secret.context_keys`` (a schema and table nobody but the owner can use) with the
built-in ``sha256()`` (no pgcrypto), and return NULL for a token that is forged, expired,
malformed, signed with an unknown key or minted for another backend (``pg_backend_pid()``).
A refusal is written to the server log (``RAISE LOG``: the server log only, not the client).

``rtv_secret.context_settings.mode`` is ``signed`` (the default) or ``unsigned`` (debugging
only: the plain settings of revision 0002 are honoured again). ``rtv-db migrate`` writes the
mode and installs the application's key(s); see ``rtv_db.signing`` and docs/signed-context.md.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from rtv_db.migrations._sql import run

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run(r"""
    -- The secret schema: only the owner may even look inside (no USAGE for anyone else), so a
    -- later "GRANT SELECT ON ALL TABLES IN SCHEMA rtv" can never reach the keys.
    CREATE SCHEMA rtv_secret AUTHORIZATION @owner@;
    REVOKE ALL ON SCHEMA rtv_secret FROM PUBLIC;
    COMMENT ON SCHEMA rtv_secret IS 'rtv-db signing keys for the tenant context: owner only';

    -- K xor ipad / K xor opad of HMAC (RFC 2104), for a key of at most one SHA-256 block.
    CREATE FUNCTION rtv_secret.hmac_pad(secret bytea, pad integer) RETURNS bytea
        LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
        SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        k bytea := secret;
    BEGIN
        IF length(k) > 64 THEN
            k := sha256(k);
        END IF;
        k := k || decode(repeat('00', 64 - length(k)), 'hex');
        FOR i IN 0..63 LOOP
            k := set_byte(k, i, get_byte(k, i) # pad);
        END LOOP;
        RETURN k;
    END
    $$;

    -- One row per valid key. Retiring a key deletes its row (the secret is not kept).
    -- No grants, no RLS: only the owner (and the SECURITY DEFINER readers, which run as the
    -- owner) can read it. The pads are stored so that verifying costs two sha256() calls.
    CREATE TABLE rtv_secret.context_keys (
        key_id     text        NOT NULL,
        secret     bytea       NOT NULL,
        inner_pad  bytea       GENERATED ALWAYS AS (rtv_secret.hmac_pad(secret, 54)) STORED,
        outer_pad  bytea       GENERATED ALWAYS AS (rtv_secret.hmac_pad(secret, 92)) STORED,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT context_keys_pkey PRIMARY KEY (key_id),
        CONSTRAINT context_keys_key_id_check CHECK (key_id ~ '^[A-Za-z0-9_-]{1,32}$'),
        CONSTRAINT context_keys_secret_check CHECK (length(secret) >= 32)
    );
    REVOKE ALL ON rtv_secret.context_keys FROM PUBLIC;

    CREATE TABLE rtv_secret.context_settings (
        singleton boolean NOT NULL DEFAULT true,
        mode      text    NOT NULL DEFAULT 'signed',
        CONSTRAINT context_settings_pkey PRIMARY KEY (singleton),
        CONSTRAINT context_settings_singleton_check CHECK (singleton),
        CONSTRAINT context_settings_mode_check CHECK (mode IN ('signed', 'unsigned'))
    );
    REVOKE ALL ON rtv_secret.context_settings FROM PUBLIC;
    INSERT INTO rtv_secret.context_settings DEFAULT VALUES;

    -- What a verified token says, or why it was refused (NULL: accepted).
    CREATE TYPE rtv_secret.context_claims AS (
        tenant_id           uuid,
        platform_account_id uuid,
        lane                text,
        refusal             text
    );

    -- Verify one token. Fields are checked only after the MAC: a token with a valid MAC was
    -- minted by a key holder, so its fields are well formed; before that nothing is cast.
    -- (No regular expression: regexp_match costs ~100 us per call, ten times everything else.)
    -- PARALLEL RESTRICTED: pg_backend_pid() in a parallel worker is the worker's pid.
    -- No SET clause here or in verified_context(): only the SECURITY DEFINER readers call them,
    -- and those fix the search_path already (each SET clause costs a GUC save/restore per call).
    CREATE FUNCTION rtv_secret.verify_token(token text, user_id text, correlation_id text)
        RETURNS rtv_secret.context_claims
        LANGUAGE plpgsql STABLE PARALLEL RESTRICTED
    AS $$
    DECLARE
        parts  text[];
        pads   record;
        result rtv_secret.context_claims;
    BEGIN
        IF token IS NULL OR token = '' THEN
            RETURN result;  -- no context at all: nothing to refuse, nothing to see
        END IF;
        IF length(token) > 256 THEN
            result.refusal := 'malformed';
            RETURN result;
        END IF;
        parts := string_to_array(token, '.');
        IF cardinality(parts) <> 8 OR parts[1] <> 'v1' OR length(parts[8]) <> 64 THEN
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
        -- now() is the transaction's start: a token valid when the transaction began stays
        -- valid for the whole transaction, and a replay in a later transaction is judged then.
        IF parts[6]::bigint <= extract(epoch FROM now()) THEN
            result.refusal := 'expired';
            RETURN result;
        END IF;
        IF parts[7]::bigint <> pg_backend_pid() THEN
            result.refusal := 'minted for another backend';
            RETURN result;
        END IF;
        -- Only rtv.set_signed_context's SET LOCAL counts: a token planted with a session-level
        -- SET (to outlive the attacker's transaction on a pooled connection) is stale in the
        -- next transaction, whose start time it cannot know in advance.
        IF current_setting('app.tenant_token_xact', true) IS DISTINCT FROM extract(epoch FROM now())::text THEN
            result.refusal := 'not set in this transaction';
            RETURN result;
        END IF;
        result.tenant_id := parts[3]::uuid;
        result.platform_account_id := CASE WHEN parts[4] <> '-' THEN parts[4]::uuid END;
        result.lane := CASE WHEN parts[5] IN ('api', 'browser') THEN parts[5] END;
        RETURN result;
    END
    $$;

    -- The context of this transaction, verified (or, in unsigned mode, the plain settings when
    -- they are set). A refusal goes to the server log with what the token claimed; the claims
    -- of a refused token are never filled in.
    CREATE FUNCTION rtv_secret.verified_context() RETURNS rtv_secret.context_claims
        LANGUAGE plpgsql STABLE PARALLEL RESTRICTED
    AS $$
    DECLARE
        token   text := current_setting('app.tenant_token', true);
        result  rtv_secret.context_claims;
        lane    text;
        claimed text;
    BEGIN
        -- The mode is looked up only without a token (the setters clear each other's settings),
        -- which spares the signed path one query per call.
        IF COALESCE(token, '') = '' AND (SELECT s.mode FROM rtv_secret.context_settings s) = 'unsigned' THEN
            result.tenant_id := rtv.to_uuid_or_null(current_setting('app.current_tenant_id', true));
            IF result.tenant_id IS NOT NULL THEN
                result.platform_account_id :=
                    rtv.to_uuid_or_null(current_setting('app.current_platform_account_id', true));
                lane := current_setting('app.current_lane', true);
                result.lane := CASE WHEN lane IN ('api', 'browser') THEN lane END;
                RETURN result;
            END IF;
        END IF;
        result := rtv_secret.verify_token(
            token,
            NULLIF(current_setting('app.current_user_id', true), ''),
            NULLIF(current_setting('app.correlation_id', true), ''));
        IF result.refusal IS NOT NULL THEN
            -- What the token claimed, sanitised (it is attacker-controlled text).
            claimed := regexp_replace(left(token, 120), '[^0-9A-Za-z._-]', '?', 'g');
            RAISE LOG 'rtv-db security: tenant context refused (%): role %, backend %, claimed tenant %, token %',
                result.refusal, session_user, pg_backend_pid(), split_part(claimed, '.', 3), left(claimed, 60);
        END IF;
        RETURN result;
    END
    $$;

    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA rtv_secret FROM PUBLIC;

    -- The readers the policies call: same names and signatures as in 0002 --------------------

    CREATE OR REPLACE FUNCTION rtv.current_tenant_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT CASE WHEN c.refusal IS NULL THEN c.tenant_id END FROM rtv_secret.verified_context() c $$;

    CREATE OR REPLACE FUNCTION rtv.current_platform_account_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT CASE WHEN c.refusal IS NULL THEN c.platform_account_id END FROM rtv_secret.verified_context() c $$;

    CREATE OR REPLACE FUNCTION rtv.current_lane() RETURNS text
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT CASE WHEN c.refusal IS NULL THEN c.lane END FROM rtv_secret.verified_context() c $$;

    -- rtv.current_user_id() and rtv.current_correlation_id() stay plain readers (cheap for
    -- per-row audit triggers): the token's MAC covers both labels, so a changed label voids
    -- the tenant context, and no RLS-checked write can carry a forged label.

    -- 'signed' or 'unsigned'. Not a secret; lets the runtime role (and rtv-db verify) see the mode.
    CREATE FUNCTION rtv.context_mode() RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT s.mode FROM rtv_secret.context_settings s $$;

    -- Why this transaction's context is refused, or NULL when it is accepted (or absent).
    CREATE FUNCTION rtv.context_refusal() RETURNS text
        LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
    AS $$ SELECT c.refusal FROM rtv_secret.verified_context() c $$;

    -- Setting the context ----------------------------------------------------------------------

    -- The application's setter: the token (and the two audit labels it signs) as bind
    -- parameters, stored with SET LOCAL (EXECUTE format: SET LOCAL also reaches Citus workers).
    -- Refuses loudly a token the readers would refuse, so a wrong key or a skewed clock is an
    -- error at BEGIN rather than silently empty results.
    -- No SET clause and no SECURITY DEFINER: a function-level SET would undo the SET LOCAL.
    CREATE FUNCTION rtv.set_signed_context(
        token text,
        user_id text DEFAULT NULL,
        correlation_id text DEFAULT NULL
    ) RETURNS void
        LANGUAGE plpgsql VOLATILE
    AS $$
    DECLARE
        refusal text;
    BEGIN
        IF token IS NULL OR token = '' THEN
            RAISE EXCEPTION 'rtv.set_signed_context: a token is required'
                USING ERRCODE = 'null_value_not_allowed';
        END IF;
        EXECUTE pg_catalog.format('SET LOCAL app.tenant_token = %L', token);
        EXECUTE pg_catalog.format('SET LOCAL app.tenant_token_xact = %L', extract(epoch FROM now())::text);
        EXECUTE pg_catalog.format('SET LOCAL app.current_user_id = %L', COALESCE(user_id, ''));
        EXECUTE pg_catalog.format('SET LOCAL app.correlation_id = %L', COALESCE(correlation_id, ''));
        -- Leftovers of the unsigned mode never mix with a signed context.
        SET LOCAL app.current_tenant_id = '';
        SET LOCAL app.current_platform_account_id = '';
        SET LOCAL app.current_lane = '';
        refusal := rtv.context_refusal();
        IF refusal IS NOT NULL THEN
            RAISE EXCEPTION 'rtv.set_signed_context: tenant context refused: %', refusal
                USING ERRCODE = 'invalid_authorization_specification',
                      HINT = 'check the context key (rtv-db key list) and the clocks; see docs/signed-context.md';
        END IF;
    END
    $$;

    -- The unsigned setter of 0002 only works in unsigned mode; in signed mode it raises, so that
    -- code still using it fails loudly instead of seeing no rows.
    CREATE OR REPLACE FUNCTION rtv.set_tenant_context(
        tenant_id uuid,
        platform_account_id uuid DEFAULT NULL,
        lane text DEFAULT NULL,
        user_id text DEFAULT NULL,
        correlation_id text DEFAULT NULL
    ) RETURNS void
        LANGUAGE plpgsql VOLATILE
    AS $$
    BEGIN
        IF rtv.context_mode() IS DISTINCT FROM 'unsigned' THEN
            RAISE EXCEPTION 'rtv.set_tenant_context is disabled: the tenant context must be signed (rtv.set_signed_context)'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'set RTV_DB_CONTEXT_MODE=unsigned and run rtv-db migrate to debug without signing';
        END IF;
        IF tenant_id IS NULL THEN
            RAISE EXCEPTION 'rtv.set_tenant_context: tenant_id is required'
                USING ERRCODE = 'null_value_not_allowed';
        END IF;
        IF lane IS NOT NULL AND lane NOT IN ('api', 'browser') THEN
            RAISE EXCEPTION 'rtv.set_tenant_context: lane must be api or browser'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SET LOCAL app.tenant_token = '';
        EXECUTE pg_catalog.format('SET LOCAL app.current_tenant_id = %L', tenant_id);
        EXECUTE pg_catalog.format('SET LOCAL app.current_platform_account_id = %L',
                                  COALESCE(platform_account_id::text, ''));
        EXECUTE pg_catalog.format('SET LOCAL app.current_lane = %L', COALESCE(lane, ''));
        EXECUTE pg_catalog.format('SET LOCAL app.current_user_id = %L', COALESCE(user_id, ''));
        EXECUTE pg_catalog.format('SET LOCAL app.correlation_id = %L', COALESCE(correlation_id, ''));
    END
    $$;

    CREATE OR REPLACE FUNCTION rtv.clear_tenant_context() RETURNS void
        LANGUAGE plpgsql VOLATILE
    AS $$
    BEGIN
        SET LOCAL app.tenant_token = '';
        SET LOCAL app.tenant_token_xact = '';
        SET LOCAL app.current_tenant_id = '';
        SET LOCAL app.current_platform_account_id = '';
        SET LOCAL app.current_lane = '';
        SET LOCAL app.current_user_id = '';
        SET LOCAL app.correlation_id = '';
    END
    $$;

    REVOKE ALL ON FUNCTION rtv.set_signed_context(text, text, text), rtv.context_mode(),
        rtv.context_refusal() FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION rtv.set_signed_context(text, text, text), rtv.context_mode(),
        rtv.context_refusal() TO @runtime@, @system@;
    """)


def downgrade() -> None:
    # Back to 0002's definitions, verbatim.
    run(r"""
    DROP FUNCTION rtv.set_signed_context(text, text, text);

    CREATE OR REPLACE FUNCTION rtv.current_tenant_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
    AS $$ SELECT rtv.to_uuid_or_null(current_setting('app.current_tenant_id', true)) $$;

    CREATE OR REPLACE FUNCTION rtv.current_platform_account_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
    AS $$ SELECT rtv.to_uuid_or_null(current_setting('app.current_platform_account_id', true)) $$;

    CREATE OR REPLACE FUNCTION rtv.current_lane() RETURNS text
        LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
    AS $$
        SELECT CASE WHEN lane IN ('api', 'browser') THEN lane END
        FROM current_setting('app.current_lane', true) AS lane
    $$;
    ALTER FUNCTION rtv.current_tenant_id() RESET ALL;
    ALTER FUNCTION rtv.current_platform_account_id() RESET ALL;
    ALTER FUNCTION rtv.current_lane() RESET ALL;

    CREATE OR REPLACE FUNCTION rtv.set_tenant_context(
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

    CREATE OR REPLACE FUNCTION rtv.clear_tenant_context() RETURNS void
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

    DROP FUNCTION rtv.context_refusal();
    DROP FUNCTION rtv.context_mode();
    DROP SCHEMA rtv_secret CASCADE;
    """)
