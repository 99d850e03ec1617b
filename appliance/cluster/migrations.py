"""The PostgreSQL schema, as numbered migrations applied once each, in order.

Append a new (version, sql) pair to change the schema; never edit an applied one. Replicas
starting together serialise on an advisory lock, so each migration runs exactly once."""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE api_keys (
            id text PRIMARY KEY,
            name text NOT NULL,
            hash text NOT NULL UNIQUE,
            scopes text[] NOT NULL,
            models text[] NOT NULL,
            requests_per_minute integer,
            tokens_per_minute integer,
            token_quota bigint,
            created_at text NOT NULL,
            expires_at text,
            revoked boolean NOT NULL DEFAULT false
        );
        CREATE TABLE requests (
            id bigserial PRIMARY KEY,
            ts double precision NOT NULL,
            key_id text,
            endpoint text NOT NULL,
            model text,
            status integer NOT NULL,
            latency_ms double precision NOT NULL,
            tokens integer NOT NULL,
            cached boolean NOT NULL,
            request_id text,
            replica text
        );
        CREATE INDEX requests_key_ts ON requests (key_id, ts);
        CREATE INDEX requests_ts ON requests (ts);
        CREATE TABLE spend (key_id text PRIMARY KEY, tokens bigint NOT NULL);
        CREATE TABLE classifiers (
            name text PRIMARY KEY,
            seq bigserial,
            owner text,
            body jsonb NOT NULL
        );
        CREATE TABLE job_leases (
            job_id text PRIMARY KEY,
            replica text NOT NULL,
            expires_at timestamptz NOT NULL
        );
        CREATE TABLE build_leases (
            slug text PRIMARY KEY,
            replica text NOT NULL,
            expires_at timestamptz NOT NULL
        );
        """,
    ),
    (
        2,
        """
        CREATE TABLE pipelines (
            name text PRIMARY KEY,
            seq bigserial,
            owner text,
            body jsonb NOT NULL
        );
        CREATE TABLE upload_grants (
            token_hash text PRIMARY KEY,
            slug text NOT NULL,
            task text,
            expires_at double precision NOT NULL
        );
        CREATE TABLE secrets (name text PRIMARY KEY, value text NOT NULL);
        """,
    ),
]

LOCK_ID = 0x6170706C69616E  # "applian": the advisory lock replicas take to migrate
