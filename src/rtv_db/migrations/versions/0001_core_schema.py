"""Core schema (S0-B2): clients and the tenant tables, with the runtime role's grants.

Every tenant table carries ``client_id``; its primary key is ``(client_id, id)``, every unique
constraint starts with ``client_id`` (names are unique per tenant, and a duplicate can never tell
one tenant about another's rows), and every foreign key between tenant tables is composite on
``client_id``, so a row can never point at another tenant's row, whatever RLS sees.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from rtv_db.migrations._sql import run

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run("""
    CREATE SCHEMA rtv AUTHORIZATION @owner@;
    COMMENT ON SCHEMA rtv IS 'rtv-db functions: tenant context, audit, verification helpers';

    -- The tenants. A tenant is a client; its own id plays the part of client_id.
    CREATE TABLE clients (
        id          uuid        NOT NULL DEFAULT gen_random_uuid(),
        name        text        NOT NULL,
        slug        text        NOT NULL,
        settings    jsonb       NOT NULL DEFAULT '{}'::jsonb,
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT clients_pkey PRIMARY KEY (id),
        -- Global, but only the system role creates clients, so it is no oracle for tenants.
        CONSTRAINT clients_slug_key UNIQUE (slug),
        CONSTRAINT clients_name_check CHECK (length(name) BETWEEN 1 AND 200),
        CONSTRAINT clients_slug_check CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
        CONSTRAINT clients_settings_check CHECK (jsonb_typeof(settings) = 'object')
    );

    -- A client's connected social account, and the lanes it may be driven through.
    CREATE TABLE platform_accounts (
        client_id    uuid        NOT NULL,
        id           uuid        NOT NULL DEFAULT gen_random_uuid(),
        platform     text        NOT NULL,
        handle       text        NOT NULL,
        display_name text,
        lanes        text[]      NOT NULL DEFAULT ARRAY['api']::text[],
        created_at   timestamptz NOT NULL DEFAULT now(),
        updated_at   timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT platform_accounts_pkey PRIMARY KEY (client_id, id),
        CONSTRAINT platform_accounts_client_id_platform_handle_key UNIQUE (client_id, platform, handle),
        CONSTRAINT platform_accounts_client_id_fkey FOREIGN KEY (client_id)
            REFERENCES clients (id) ON DELETE CASCADE,
        CONSTRAINT platform_accounts_platform_check
            CHECK (platform IN ('instagram', 'x', 'linkedin', 'tiktok', 'facebook', 'youtube', 'threads')),
        CONSTRAINT platform_accounts_handle_check CHECK (length(handle) BETWEEN 1 AND 200),
        CONSTRAINT platform_accounts_lanes_check
            CHECK (cardinality(lanes) >= 1 AND lanes <@ ARRAY['api', 'browser']::text[])
    );

    CREATE TABLE brand_kits (
        client_id  uuid        NOT NULL,
        id         uuid        NOT NULL DEFAULT gen_random_uuid(),
        name       text        NOT NULL,
        tone       jsonb       NOT NULL DEFAULT '{"voice": "neutral", "personality": []}'::jsonb,
        colors     jsonb       NOT NULL DEFAULT '{}'::jsonb,
        logo_refs  jsonb       NOT NULL DEFAULT '[]'::jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT brand_kits_pkey PRIMARY KEY (client_id, id),
        CONSTRAINT brand_kits_client_id_name_key UNIQUE (client_id, name),
        CONSTRAINT brand_kits_client_id_fkey FOREIGN KEY (client_id)
            REFERENCES clients (id) ON DELETE CASCADE,
        CONSTRAINT brand_kits_name_check CHECK (length(name) BETWEEN 1 AND 200),
        CONSTRAINT brand_kits_tone_check CHECK (jsonb_typeof(tone) = 'object'),
        CONSTRAINT brand_kits_colors_check CHECK (jsonb_typeof(colors) = 'object'),
        CONSTRAINT brand_kits_logo_refs_check CHECK (jsonb_typeof(logo_refs) = 'array')
    );

    CREATE TABLE knowledge_bases (
        client_id   uuid        NOT NULL,
        id          uuid        NOT NULL DEFAULT gen_random_uuid(),
        name        text        NOT NULL,
        description text,
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT knowledge_bases_pkey PRIMARY KEY (client_id, id),
        CONSTRAINT knowledge_bases_client_id_name_key UNIQUE (client_id, name),
        CONSTRAINT knowledge_bases_client_id_fkey FOREIGN KEY (client_id)
            REFERENCES clients (id) ON DELETE CASCADE,
        CONSTRAINT knowledge_bases_name_check CHECK (length(name) BETWEEN 1 AND 200)
    );

    CREATE TABLE knowledge_chunks (
        client_id         uuid        NOT NULL,
        id                uuid        NOT NULL DEFAULT gen_random_uuid(),
        knowledge_base_id uuid        NOT NULL,
        content           text        NOT NULL,
        metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
        embedding         vector(384),
        created_at        timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT knowledge_chunks_pkey PRIMARY KEY (client_id, id),
        -- Composite: a chunk can only belong to a knowledge base of its own tenant.
        CONSTRAINT knowledge_chunks_knowledge_base_fkey FOREIGN KEY (client_id, knowledge_base_id)
            REFERENCES knowledge_bases (client_id, id) ON DELETE CASCADE,
        CONSTRAINT knowledge_chunks_metadata_check CHECK (jsonb_typeof(metadata) = 'object')
    );
    CREATE INDEX knowledge_chunks_client_id_knowledge_base_id_idx
        ON knowledge_chunks (client_id, knowledge_base_id);
    -- Approximate nearest neighbours; RLS and the client_id predicate filter the candidates.
    CREATE INDEX knowledge_chunks_embedding_idx
        ON knowledge_chunks USING hnsw (embedding vector_cosine_ops);

    -- Side effects to carry out on a platform, through one account and one lane.
    CREATE TABLE platform_actions (
        client_id           uuid        NOT NULL,
        id                  uuid        NOT NULL DEFAULT gen_random_uuid(),
        platform_account_id uuid        NOT NULL,
        kind                text        NOT NULL,
        payload             jsonb       NOT NULL DEFAULT '{}'::jsonb,
        lane                text        NOT NULL,
        status              text        NOT NULL DEFAULT 'pending',
        scheduled_at        timestamptz,
        finished_at         timestamptz,
        created_at          timestamptz NOT NULL DEFAULT now(),
        updated_at          timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT platform_actions_pkey PRIMARY KEY (client_id, id),
        -- Composite: an action can only use an account of its own tenant.
        CONSTRAINT platform_actions_platform_account_fkey FOREIGN KEY (client_id, platform_account_id)
            REFERENCES platform_accounts (client_id, id) ON DELETE CASCADE,
        CONSTRAINT platform_actions_lane_check CHECK (lane IN ('api', 'browser')),
        CONSTRAINT platform_actions_status_check
            CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
        CONSTRAINT platform_actions_kind_check CHECK (length(kind) BETWEEN 1 AND 100),
        CONSTRAINT platform_actions_payload_check CHECK (jsonb_typeof(payload) = 'object')
    );
    CREATE INDEX platform_actions_client_id_account_status_idx
        ON platform_actions (client_id, platform_account_id, status, scheduled_at);

    -- Grants. The runtime role reads and writes tenant rows (RLS decides which) and nothing else:
    -- no TRUNCATE (RLS does not cover it), no REFERENCES, no TRIGGER, no CREATE anywhere.
    REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
    GRANT USAGE ON SCHEMA public, rtv TO @runtime@, @system@;
    -- A tenant may read and rename itself; creating and deleting tenants is the system scope's job.
    GRANT SELECT, UPDATE (name, settings, updated_at) ON clients TO @runtime@;
    GRANT SELECT, INSERT, UPDATE, DELETE
        ON platform_accounts, brand_kits, knowledge_bases, knowledge_chunks, platform_actions
        TO @runtime@;
    -- The system role (BYPASSRLS) works across tenants, still without TRUNCATE or DDL.
    GRANT SELECT, INSERT, UPDATE, DELETE
        ON clients, platform_accounts, brand_kits, knowledge_bases, knowledge_chunks, platform_actions
        TO @system@;
    """)


def downgrade() -> None:
    run("""
    DROP TABLE platform_actions;
    DROP TABLE knowledge_chunks;
    DROP TABLE knowledge_bases;
    DROP TABLE brand_kits;
    DROP TABLE platform_accounts;
    DROP TABLE clients;
    DROP SCHEMA rtv;
    """)
