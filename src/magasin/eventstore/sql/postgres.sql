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

CREATE TABLE IF NOT EXISTS stream_snapshots (
    stream_id      text NOT NULL,
    version        integer NOT NULL,
    schema_version integer NOT NULL,
    state          jsonb NOT NULL,
    taken_at       timestamptz NOT NULL,
    event_at       timestamptz,
    PRIMARY KEY (stream_id, version)
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

-- No statement filters, joins or sorts on these columns: ANALYZE gathers no statistics on
-- them. Its cost on a young schema, re-analyzed at each 10% of growth, was mostly sorting
-- and detoasting the JSON bodies (8% of the backends' CPU in a 10-s saga benchmark).
-- Altered only where still needed: an ALTER TABLE at every open would lock the tables
-- (against a running ANALYZE) and make every session re-plan.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT a.attrelid::regclass AS tab, a.attname AS col
        FROM pg_attribute a
        JOIN (VALUES ('events', 'payload'), ('events', 'metadata'), ('events', 'traceparent'),
                     ('events', 'causation_id'), ('stream_snapshots', 'state'),
                     ('documents', 'body')) AS w(tab, col)
          ON a.attrelid = to_regclass(w.tab) AND a.attname = w.col
        WHERE a.attstattarget <> 0
    LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET STATISTICS 0', c.tab, c.col);
    END LOOP;
END
$$;

-- The outbox is two positions in the log, kept as checkpoints: 'outbox:publish', the last
-- event published to its consumers, and 'outbox:ship', the last one shipped to the
-- consumers of the whole log. Earlier versions kept a row per waiting event in two tables
-- (four row writes an event); their rows become the positions, then the tables go.
DO $$
BEGIN
    IF to_regclass('outbox') IS NOT NULL THEN
        INSERT INTO checkpoints (name, position)
        SELECT 'outbox:publish', coalesce((SELECT min(global_position) - 1 FROM outbox),
                                          (SELECT max(global_position) FROM events), 0)
        ON CONFLICT DO NOTHING;
        INSERT INTO checkpoints (name, position)
        SELECT 'outbox:ship', least(
            coalesce((SELECT min(global_position) - 1 FROM outbox_log),
                     (SELECT position FROM checkpoints WHERE name = 'outbox:publish')),
            (SELECT position FROM checkpoints WHERE name = 'outbox:publish'))
        ON CONFLICT DO NOTHING;
        DROP TABLE outbox;
        DROP TABLE IF EXISTS outbox_log;
    END IF;
END
$$;

-- Appends several units in one call (and so, in autocommit, one transaction), each on its
-- own terms: unit k owns events p_unit_ends[k-1]+1 .. p_unit_ends[k]. Per unit, outcome 0:
-- appended, o_versions holds the stream's new version and o_positions gets the events'
-- positions in order; 1: some of its ids are stored already (the caller tells an idempotent
-- retry from a duplicate); 2: the expected version does not match, o_versions holds the
-- actual one. Units with outcome 1 or 2 write nothing and leave the others unaffected.
-- Earlier versions also took a p_outbox.
DROP FUNCTION IF EXISTS magasin_append(integer[], text[], integer[], text[], text[], integer[],
    timestamptz[], text[], text[], text[], text[], text[], boolean);
CREATE OR REPLACE FUNCTION magasin_append(
    p_unit_ends       integer[],
    p_stream_ids      text[],
    p_expected        integer[],
    p_event_ids       text[],
    p_types           text[],
    p_schema_versions integer[],
    p_occurred_at     timestamptz[],
    p_correlation_ids text[],
    p_causation_ids   text[],
    p_traceparents    text[],
    p_metadata        text[],
    p_payloads        text[],
    OUT o_outcomes    integer[],
    OUT o_versions    integer[],
    OUT o_positions   bigint[]
) LANGUAGE plpgsql AS $$
DECLARE
    lo          integer;
    n           integer;
    v_ids       text[];
    v_version   integer;
    v_positions bigint[];
BEGIN
    o_outcomes := '{}';
    o_versions := '{}';
    o_positions := '{}';
    FOR k IN 1 .. cardinality(p_unit_ends) LOOP
        lo := coalesce(p_unit_ends[k - 1], 0) + 1;
        n := p_unit_ends[k] - lo + 1;
        v_ids := p_event_ids[lo:p_unit_ends[k]];
        -- EXISTS: its index probe costs 25-55 us less of the server's CPU per append than
        -- count(*) did. (count(*) was chosen when, on a table without statistics, EXISTS's
        -- fast-start plan could be a sequential scan; the store's sessions now run with
        -- enable_seqscan = off, so the plan is the unique index's whatever the statistics.)
        IF EXISTS (SELECT 1 FROM events WHERE event_id = ANY (v_ids)) THEN
            o_outcomes := o_outcomes || 1;
            o_versions := o_versions || NULL::integer;
            CONTINUE;
        END IF;

        -- Invariant the gap-safe reader depends on: this write gives the transaction its
        -- id before nextval() below allocates positions. Keep it before the first nextval.
        v_version := NULL;
        IF p_expected[k] IS NULL THEN
            INSERT INTO streams AS s (stream_id, version) VALUES (p_stream_ids[k], n)
            ON CONFLICT (stream_id) DO UPDATE SET version = s.version + n
            RETURNING s.version INTO v_version;
        ELSIF p_expected[k] = 0 THEN
            INSERT INTO streams AS s (stream_id, version) VALUES (p_stream_ids[k], n)
            ON CONFLICT (stream_id) DO NOTHING
            RETURNING s.version INTO v_version;
        ELSE
            UPDATE streams AS s SET version = s.version + n
            WHERE s.stream_id = p_stream_ids[k] AND s.version = p_expected[k]
            RETURNING s.version INTO v_version;
        END IF;

        IF v_version IS NULL THEN
            -- Each statement sees a fresh snapshot: if the append that beat us carried
            -- these very events, this is a retry racing its original, not a conflict.
            IF EXISTS (SELECT 1 FROM events WHERE event_id = ANY (v_ids)) THEN
                o_outcomes := o_outcomes || 1;
                o_versions := o_versions || NULL::integer;
            ELSE
                o_outcomes := o_outcomes || 2;
                o_versions := o_versions || coalesce(
                    (SELECT s.version FROM streams AS s WHERE s.stream_id = p_stream_ids[k]), 0);
            END IF;
            CONTINUE;
        END IF;

        -- Allocated one by one in array order, so positions grow with stream versions. One
        -- event (most appends) takes an expression, not a query: no executor start-up.
        IF n = 1 THEN
            v_positions := ARRAY[nextval('events_global_position_seq')];
        ELSE
            v_positions := ARRAY(SELECT nextval('events_global_position_seq')
                                 FROM generate_series(1, n));
        END IF;
        INSERT INTO events (global_position, event_id, stream_id, stream_version, type,
                            schema_version, occurred_at, correlation_id, causation_id,
                            traceparent, metadata, payload)
        SELECT v_positions[i], v_ids[i], p_stream_ids[k], v_version - n + i,
               p_types[lo + i - 1], p_schema_versions[lo + i - 1], p_occurred_at[lo + i - 1],
               p_correlation_ids[lo + i - 1], p_causation_ids[lo + i - 1],
               p_traceparents[lo + i - 1], p_metadata[lo + i - 1]::jsonb,
               p_payloads[lo + i - 1]::jsonb
        FROM generate_series(1, n) AS i;
        o_outcomes := o_outcomes || 0;
        o_versions := o_versions || v_version;
        o_positions := o_positions || v_positions;
    END LOOP;
END
$$;

-- A whole unit of work in one call (so, in autocommit, one round trip and one
-- transaction): inbox marks first (a consumer that handled the event already fails fast),
-- then the appends through magasin_append, then checkpoints and documents in the order
-- given (a NULL body deletes the document). A checkpoint with an expected position moves
-- only from there (its row locked first, so two conditional writers are serialised). Any
-- refusal raises, rolling everything back: MG001 inbox (DETAIL: index of the mark), MG002
-- an append (DETAIL: outcomes;versions), MG003 a checkpoint (DETAIL: index;actual).
-- Version checks (p_check_*: each stream must be at that version, 0 for none, before the
-- appends; with a p_check_before, only its events up to that global position count) come
-- after the marks: MG004 (DETAIL: index;actual). A NULL array is an empty one (the client
-- sends NULL for none: cheaper to encode).
-- Earlier versions had no p_checkpoint_expected, then no p_check_*, then a p_outbox: drop
-- them rather than keep overloads.
DROP FUNCTION IF EXISTS magasin_commit(text[], text[], integer[], text[], integer[], text[],
    text[], integer[], timestamptz[], text[], text[], text[], text[], text[], boolean, text[],
    bigint[], text[], text[], text[]);
DROP FUNCTION IF EXISTS magasin_commit(text[], text[], integer[], text[], integer[], text[],
    text[], integer[], timestamptz[], text[], text[], text[], text[], text[], boolean, text[],
    bigint[], bigint[], text[], text[], text[]);
DROP FUNCTION IF EXISTS magasin_commit(text[], text[], integer[], text[], integer[], text[],
    text[], integer[], timestamptz[], text[], text[], text[], text[], text[], boolean, text[],
    bigint[], bigint[], text[], text[], text[], text[], integer[]);
DROP FUNCTION IF EXISTS magasin_commit(text[], text[], integer[], text[], integer[], text[],
    text[], integer[], timestamptz[], text[], text[], text[], text[], text[], boolean, text[],
    bigint[], bigint[], text[], text[], text[], text[], integer[], bigint[]);

CREATE OR REPLACE FUNCTION magasin_commit(
    p_inbox_consumers     text[],
    p_inbox_ids           text[],
    p_unit_ends           integer[],
    p_stream_ids          text[],
    p_expected            integer[],
    p_event_ids           text[],
    p_types               text[],
    p_schema_versions     integer[],
    p_occurred_at         timestamptz[],
    p_correlation_ids     text[],
    p_causation_ids       text[],
    p_traceparents        text[],
    p_metadata            text[],
    p_payloads            text[],
    p_checkpoint_names    text[],
    p_checkpoint_positions bigint[],
    p_checkpoint_expected bigint[],
    p_doc_collections     text[],
    p_doc_keys            text[],
    p_doc_bodies          text[],
    p_check_streams       text[],
    p_check_versions      integer[],
    p_check_before        bigint[],
    OUT o_outcomes        integer[],
    OUT o_versions        integer[],
    OUT o_positions       bigint[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_actual   bigint;
    v_index    bigint;
    v_appended record;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_inbox_ids), 0) LOOP
        INSERT INTO inbox (consumer, event_id) VALUES (p_inbox_consumers[i], p_inbox_ids[i])
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'already processed' USING ERRCODE = 'MG001', DETAIL = i::text;
        END IF;
    END LOOP;
    IF coalesce(cardinality(p_check_streams), 0) > 0 THEN
        SELECT c.i, coalesce(s.version, 0) INTO v_index, v_actual
        FROM unnest(p_check_streams, p_check_versions, p_check_before)
             WITH ORDINALITY AS c(stream_id, version, before, i)
        LEFT JOIN streams AS s ON s.stream_id = c.stream_id
        WHERE coalesce(s.version, 0) <> c.version
          AND (c.before IS NULL OR coalesce(s.version, 0) < c.version OR EXISTS (
              SELECT 1 FROM events AS e WHERE e.stream_id = c.stream_id
              AND e.stream_version > c.version AND e.global_position <= c.before))
        ORDER BY c.i LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'stream moved' USING ERRCODE = 'MG004',
                DETAIL = v_index::text || ';' || v_actual::text;
        END IF;
    END IF;
    o_outcomes := '{}';
    o_versions := '{}';
    o_positions := '{}';
    IF coalesce(cardinality(p_unit_ends), 0) > 0 THEN
        -- An assignment from a call, not a SELECT ... FROM the function: no executor.
        v_appended := magasin_append(p_unit_ends, p_stream_ids, p_expected, p_event_ids,
                                     p_types, p_schema_versions, p_occurred_at,
                                     p_correlation_ids, p_causation_ids, p_traceparents,
                                     p_metadata, p_payloads);
        o_outcomes := v_appended.o_outcomes;
        o_versions := v_appended.o_versions;
        o_positions := v_appended.o_positions;
        IF NOT 0 = ALL (o_outcomes) THEN  -- an expression, not a query over unnest()
            RAISE EXCEPTION 'append refused' USING ERRCODE = 'MG002',
                DETAIL = array_to_string(o_outcomes, ',') || ';'
                         || array_to_string(o_versions, ',', '');
        END IF;
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_checkpoint_names), 0) LOOP
        IF p_checkpoint_expected[i] IS NOT NULL THEN
            INSERT INTO checkpoints (name, position) VALUES (p_checkpoint_names[i], 0)
            ON CONFLICT DO NOTHING;
            SELECT position INTO v_actual FROM checkpoints
            WHERE name = p_checkpoint_names[i] FOR UPDATE;
            IF v_actual <> p_checkpoint_expected[i] THEN
                RAISE EXCEPTION 'checkpoint moved' USING ERRCODE = 'MG003',
                    DETAIL = i::text || ';' || v_actual::text;
            END IF;
        END IF;
        INSERT INTO checkpoints (name, position)
        VALUES (p_checkpoint_names[i], p_checkpoint_positions[i])
        ON CONFLICT (name) DO UPDATE SET position = excluded.position;
    END LOOP;
    FOR i IN 1 .. coalesce(cardinality(p_doc_keys), 0) LOOP
        IF p_doc_bodies[i] IS NULL THEN
            DELETE FROM documents WHERE collection = p_doc_collections[i] AND key = p_doc_keys[i];
        ELSE
            INSERT INTO documents (collection, key, body)
            VALUES (p_doc_collections[i], p_doc_keys[i], p_doc_bodies[i]::jsonb)
            ON CONFLICT (collection, key) DO UPDATE SET body = excluded.body;
        END IF;
    END LOOP;
END
$$;
