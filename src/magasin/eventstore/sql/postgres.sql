-- Schema of the PostgreSQL event store. Runs on a connection whose search_path is the
-- store's schema, under an advisory lock; every statement is idempotent.

-- CACHE 1 (the default) matters: positions are then handed out in real-time order across
-- sessions, which the gap-safe reader relies on.
CREATE SEQUENCE IF NOT EXISTS events_global_position_seq AS bigint CACHE 1;

CREATE TABLE IF NOT EXISTS events (
    global_position bigint PRIMARY KEY,
    event_id        text NOT NULL UNIQUE,
    stream_id       text NOT NULL,
    stream_version  integer NOT NULL,
    type            text NOT NULL,
    schema_version  integer NOT NULL,
    occurred_at     timestamptz NOT NULL,
    correlation_id  text,
    causation_id    text,
    traceparent     text,
    metadata        jsonb NOT NULL,
    payload         jsonb NOT NULL,
    UNIQUE (stream_id, stream_version)
);
CREATE INDEX IF NOT EXISTS events_correlation ON events (correlation_id);

CREATE TABLE IF NOT EXISTS streams (
    stream_id text PRIMARY KEY,
    version   integer NOT NULL
);

CREATE TABLE IF NOT EXISTS snapshots (
    stream_id      text PRIMARY KEY,
    version        integer NOT NULL,
    schema_version integer NOT NULL,
    state          jsonb NOT NULL,
    taken_at       timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS inbox (
    consumer     text NOT NULL,
    event_id     text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE TABLE IF NOT EXISTS checkpoints (
    name     text PRIMARY KEY,
    position bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS documents (
    collection text NOT NULL,
    key        text NOT NULL,
    body       jsonb NOT NULL,
    PRIMARY KEY (collection, key)
);

CREATE TABLE IF NOT EXISTS outbox (
    global_position bigint PRIMARY KEY
);

-- One append in one round trip. Outcome 0: appended, o_version is the stream's new version
-- and o_positions the events' positions in order. Outcome 1: some of the ids are stored
-- already (the caller tells an idempotent retry from a duplicate). Outcome 2: the expected
-- version does not match, o_version is the actual one; nothing was written.
CREATE OR REPLACE FUNCTION magasin_append(
    p_stream_id       text,
    p_expected        integer,
    p_event_ids       text[],
    p_types           text[],
    p_schema_versions integer[],
    p_occurred_at     timestamptz[],
    p_correlation_ids text[],
    p_causation_ids   text[],
    p_traceparents    text[],
    p_metadata        text[],
    p_payloads        text[],
    p_outbox          boolean,
    OUT o_outcome     integer,
    OUT o_version     integer,
    OUT o_positions   bigint[]
) LANGUAGE plpgsql AS $$
DECLARE
    n integer := cardinality(p_event_ids);
BEGIN
    IF EXISTS (SELECT 1 FROM events WHERE event_id = ANY (p_event_ids)) THEN
        o_outcome := 1;
        RETURN;
    END IF;

    -- Invariant the gap-safe reader depends on: this write gives the transaction its id
    -- before nextval() below allocates positions. Keep it the first write of an append.
    IF p_expected IS NULL THEN
        INSERT INTO streams AS s (stream_id, version) VALUES (p_stream_id, n)
        ON CONFLICT (stream_id) DO UPDATE SET version = s.version + n
        RETURNING s.version INTO o_version;
    ELSIF p_expected = 0 THEN
        INSERT INTO streams AS s (stream_id, version) VALUES (p_stream_id, n)
        ON CONFLICT (stream_id) DO NOTHING
        RETURNING s.version INTO o_version;
    ELSE
        UPDATE streams AS s SET version = s.version + n
        WHERE s.stream_id = p_stream_id AND s.version = p_expected
        RETURNING s.version INTO o_version;
    END IF;

    IF NOT FOUND THEN
        -- Each statement sees a fresh snapshot: if the append that beat us carried these
        -- very events, this is a retry racing its original, not a conflict.
        IF EXISTS (SELECT 1 FROM events WHERE event_id = ANY (p_event_ids)) THEN
            o_outcome := 1;
            RETURN;
        END IF;
        o_outcome := 2;
        o_version := coalesce((SELECT s.version FROM streams AS s
                               WHERE s.stream_id = p_stream_id), 0);
        RETURN;
    END IF;

    -- Allocated one by one in array order, so positions grow with stream versions.
    o_positions := ARRAY(SELECT nextval('events_global_position_seq')
                         FROM generate_series(1, n));
    INSERT INTO events (global_position, event_id, stream_id, stream_version, type,
                        schema_version, occurred_at, correlation_id, causation_id,
                        traceparent, metadata, payload)
    SELECT o_positions[i], p_event_ids[i], p_stream_id, o_version - n + i, p_types[i],
           p_schema_versions[i], p_occurred_at[i], p_correlation_ids[i],
           p_causation_ids[i], p_traceparents[i], p_metadata[i]::jsonb,
           p_payloads[i]::jsonb
    FROM generate_series(1, n) AS i;

    IF p_outbox THEN
        INSERT INTO outbox (global_position) SELECT unnest(o_positions);
    END IF;
    o_outcome := 0;
END
$$;
