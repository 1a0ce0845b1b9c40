"""Tables of the PostgreSQL leases, KV, streams and pub/sub (run by schema.py's
migrations, inside the space's schema: names are unqualified).

Every statement is idempotent (``IF NOT EXISTS``, ``ON CONFLICT DO NOTHING``),
so a migration that runs them twice, or two processes that run them at once
under the migration lock, change nothing the second time.

- ``lease_names``: one row per lease name, locked (``SELECT … FOR UPDATE``
  through an upsert) by every acquire of the name before it counts the live
  grants, so capacity holds under READ COMMITTED.
- ``lease_grants``: one row per grant; ``capacity`` is the capacity the
  acquire asked for (a name's capacity is the one its live grants carry).
- ``kv`` / ``kv_changes`` / ``kv_state``: live keys (``COLLATE "C"``: byte
  order, as scans promise), the change feed (one row per change, primary key
  (revision, key)) and the compaction point. Every KV write first takes the
  space's KV lock (``kv_lock()``: a transaction-level advisory lock, which
  writes no WAL, so a txn whose compare fails commits nothing), so revision
  order is commit order: a feed reader that resumed after revision r can
  never be passed by a later commit below r. Revisions come from the
  SEQUENCE ``kv_revision``.
- functions ``kv_txn`` and ``kv_incr``: a whole KV write in one statement
  (one round trip, the lock held only while the server runs it: they commit
  with ``synchronous_commit = off`` and the client then waits for the WAL
  flush outside the lock, see kv.py), with ``kv_lock``, ``kv_expire_due``,
  ``kv_notify`` and ``request_remember``.
- ``request_ids``: replies of kv.txn / kv.incr / streams.append_many kept
  REQUEST_ID_TTL_S by request id, so a retry after a lost reply returns the
  first reply.
- ``stream_heads`` / ``stream_entries``: per stream, the last id handed out
  (kept after a trim, so ids are never reused) and the entries.
- ``pubsub_payloads``: messages too large for a NOTIFY payload, kept
  PAYLOAD_RETENTION_S (see pubsub.py).
"""

from __future__ import annotations

# The space's KV lock and the lease clock after it was granted.
KV_LOCK = """
CREATE OR REPLACE FUNCTION kv_lock() RETURNS double precision
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('taskspace.kv:' || current_schema()), 7);
    RETURN lease_now();
END $$"""

# Record up to p_limit due expiries (and those of p_keys, whose rows the caller
# locked), each at a revision of its own; the keys that expired. Rows another
# transaction holds are skipped (it may be waiting for the KV lock we hold).
KV_EXPIRE_DUE = """
CREATE OR REPLACE FUNCTION kv_expire_due(
    p_now double precision, p_keys text[], p_limit integer
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM kv WHERE expires <= p_now) THEN
        RETURN '{}';
    END IF;
    WITH free AS (
        SELECT key FROM kv WHERE expires <= p_now ORDER BY expires LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), due AS (
        SELECT key FROM free
        UNION SELECT key FROM kv WHERE key = ANY(p_keys) AND expires <= p_now
    ), gone AS (
        DELETE FROM kv USING due WHERE kv.key = due.key RETURNING kv.key, kv.version
    ), logged AS (
        INSERT INTO kv_changes (revision, key, kind, version)
        SELECT nextval('kv_revision'), key, 'expire', version
        FROM (SELECT key, version FROM gone ORDER BY key) g RETURNING key
    )
    SELECT COALESCE(array_agg(key), '{}') INTO v_keys FROM logged;
    RETURN v_keys;
END $$"""

# NOTIFY (at commit) every waiter key kv:<prefix> of the written keys that
# someone is waiting on (the waiters table of waiter.py).
KV_NOTIFY = """
CREATE OR REPLACE FUNCTION kv_notify(p_channel text, p_keys text[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_keys) > 0
       AND EXISTS (SELECT 1 FROM waiters WHERE key >= 'kv:' AND key < 'kv;') THEN
        PERFORM pg_notify(p_channel, w.key) FROM waiters w
        WHERE w.key IN (SELECT 'kv:' || left(k, n)
                        FROM unnest(p_keys) AS k, generate_series(0, length(k)) AS n)
          AND w.until > extract(epoch FROM clock_timestamp());
    END IF;
END $$"""

# Keep a call's reply for its request id (nothing for ''), dropping a few
# expired ids of any family on the way.
REQUEST_REMEMBER = """
CREATE OR REPLACE FUNCTION request_remember(
    p_family text, p_id text, p_reply jsonb, p_now double precision, p_ttl double precision
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_id = '' THEN
        RETURN;
    END IF;
    DELETE FROM request_ids WHERE (family, id) IN (
        SELECT family, id FROM request_ids WHERE expires <= p_now
        LIMIT 16 FOR UPDATE SKIP LOCKED);
    INSERT INTO request_ids (family, id, reply, expires)
    VALUES (p_family, p_id, p_reply, p_now + p_ttl)
    ON CONFLICT (family, id) DO UPDATE SET reply = EXCLUDED.reply, expires = EXCLUDED.expires;
END $$"""

# Lock the existing rows of p_keys, in key order, before the KV lock (every KV
# writer does, so the KV lock's holder never waits for a row). p_vkeys/p_vers:
# keys a VersionIs compares; a row whose version moved on is not locked, and
# the function returns true (stale). Transactions that waited on the same row
# are woken together by its holder's commit and each re-checks the version on
# the new row at once, so the losers of a compare-and-set race fail in
# parallel instead of queueing one by one for the KV lock.
KV_LOCK_ROWS = """
CREATE OR REPLACE FUNCTION kv_lock_rows(p_keys text[], p_vkeys text[], p_vers bigint[])
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_locked text[];
BEGIN
    WITH e AS (
        SELECT x.key, max(x.ver) AS ver FROM (
            SELECT k AS key, NULL::bigint AS ver FROM unnest(p_keys) AS k
            UNION ALL SELECT k, v FROM unnest(p_vkeys, p_vers) AS y(k, v)
        ) x GROUP BY x.key
    )
    SELECT array_agg(l.key) INTO v_locked FROM (
        SELECT kv.key FROM kv JOIN e ON kv.key = e.key
        WHERE e.ver IS NULL OR kv.version = e.ver
        ORDER BY kv.key FOR UPDATE OF kv
    ) l;
    RETURN NOT (p_vkeys <@ COALESCE(v_locked, '{}'));
END $$"""

# The 0-based index of the first compare of a kv_txn that does not hold at
# p_now (see KV_TXN for the arrays), or NULL.
KV_FAILED_COMPARE = """
CREATE OR REPLACE FUNCTION kv_failed_compare(
    c_kind text[], c_key text[], c_ver bigint[], c_val bytea[], c_arg text[],
    p_now double precision
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_ok boolean;
    v_value bytea;
    v_version bigint;
BEGIN
    FOR i IN 1 .. COALESCE(array_length(c_kind, 1), 0) LOOP
        IF c_kind[i] = 'grant' THEN
            v_ok := EXISTS (SELECT 1 FROM lease_grants WHERE id = c_arg[i]
                            AND token = c_ver[i] AND name = c_key[i] AND expires > p_now);
        ELSE
            v_value := NULL;
            v_version := NULL;
            SELECT value, version INTO v_value, v_version FROM kv
            WHERE key = c_key[i] AND (expires IS NULL OR expires > p_now);
            v_ok := CASE c_kind[i]
                WHEN 'ver' THEN v_version IS NOT DISTINCT FROM c_ver[i]
                WHEN 'val' THEN v_version IS NOT NULL AND v_value = c_val[i]
                ELSE (v_version IS NOT NULL) = (c_arg[i] = 't') END;
        END IF;
        IF NOT v_ok THEN
            RETURN i - 1;
        END IF;
    END LOOP;
    RETURN NULL;
END $$"""

# kv.txn in one statement (it NOTIFYs the waiters of the keys whose expiry it
# recorded; those of the keys it wrote are woken by the client's next statement,
# after the commit: kv.py's _durable). Compares: c_kind 'ver' (c_ver: the version, NULL:
# absent), 'val' (c_val), 'ex' (c_arg 't'/'f'), 'grant' (c_key: lease name,
# c_arg: grant id, c_ver: token). Writes: w_kind 'put' (w_val, w_ttl: seconds
# or NULL) or 'del'. Reply: {ok, revision, now} or {ok: false, failed
# (0-based), revision, now}.
KV_TXN = """
CREATE OR REPLACE FUNCTION kv_txn(
    p_request text, c_kind text[], c_key text[], c_ver bigint[], c_val bytea[], c_arg text[],
    w_kind text[], w_key text[], w_val bytea[], w_ttl double precision[],
    p_channel text, p_request_ttl double precision
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_now double precision;
    v_reply jsonb;
    v_touched text[];
    v_dels text[];
    v_rev bigint;
    v_failed integer;
BEGIN
    -- Committed without waiting for the WAL flush, so the KV lock is not held
    -- through an fsync; the client waits for the flush after (kv.py: durable).
    PERFORM set_config('synchronous_commit', 'off', true);
    IF kv_lock_rows(
        w_key || ARRAY(SELECT c_key[i] FROM generate_subscripts(c_kind, 1) AS i
                       WHERE c_kind[i] <> 'grant'),
        ARRAY(SELECT c_key[i] FROM generate_subscripts(c_kind, 1) AS i
              WHERE c_kind[i] = 'ver' AND c_ver[i] IS NOT NULL),
        ARRAY(SELECT c_ver[i] FROM generate_subscripts(c_kind, 1) AS i
              WHERE c_kind[i] = 'ver' AND c_ver[i] IS NOT NULL)
    ) AND p_request = '' THEN
        -- A version compared moved on: fail now, without the KV lock (a retried
        -- request id must see its first reply instead: it takes the lock).
        v_now := lease_now();
        v_failed := kv_failed_compare(c_kind, c_key, c_ver, c_val, c_arg, v_now);
        IF v_failed IS NOT NULL THEN
            RETURN jsonb_build_object('ok', false, 'failed', v_failed, 'now', v_now,
                'revision', (SELECT COALESCE(max(revision), 0) FROM kv_changes));
        END IF;
    END IF;
    v_now := kv_lock();
    IF p_request <> '' THEN
        SELECT reply INTO v_reply FROM request_ids
        WHERE family = 'kv.txn' AND id = p_request AND expires > v_now;
        IF v_reply IS NOT NULL THEN
            RETURN v_reply;
        END IF;
    END IF;
    v_touched := kv_expire_due(v_now, w_key, 100);
    v_failed := kv_failed_compare(c_kind, c_key, c_ver, c_val, c_arg, v_now);
    IF v_failed IS NOT NULL THEN
        v_reply := jsonb_build_object('ok', false, 'failed', v_failed, 'now', v_now,
            'revision', (SELECT COALESCE(max(revision), 0) FROM kv_changes));
        PERFORM request_remember('kv.txn', p_request, v_reply, v_now, p_request_ttl);
        PERFORM kv_notify(p_channel, v_touched);
        RETURN v_reply;
    END IF;
    v_dels := ARRAY(SELECT w.key FROM unnest(w_kind, w_key) AS w(kind, key)
                    WHERE w.kind = 'del' AND EXISTS (SELECT 1 FROM kv WHERE kv.key = w.key));
    IF cardinality(v_dels) > 0 OR 'put' = ANY(w_kind) THEN
        v_rev := nextval('kv_revision');
        WITH p AS (
            SELECT w.key, w.value, w.ttl FROM unnest(w_kind, w_key, w_val, w_ttl)
                AS w(kind, key, value, ttl) WHERE w.kind = 'put'
        ), up AS (
            INSERT INTO kv (key, value, version, expires)
            SELECT p.key, p.value, v_rev, v_now + p.ttl FROM p
            ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
                version = EXCLUDED.version, expires = EXCLUDED.expires
        ), d AS (
            DELETE FROM kv WHERE key = ANY(v_dels) RETURNING key, version
        )
        INSERT INTO kv_changes (revision, key, kind, version, value)
        SELECT v_rev, p.key, 'put', v_rev, p.value FROM p
        UNION ALL SELECT v_rev, d.key, 'delete', d.version, NULL FROM d;
    ELSE
        v_rev := (SELECT COALESCE(max(revision), 0) FROM kv_changes);
    END IF;
    v_reply := jsonb_build_object('ok', true, 'revision', v_rev, 'now', v_now);
    PERFORM request_remember('kv.txn', p_request, v_reply, v_now, p_request_ttl);
    PERFORM kv_notify(p_channel, v_touched);
    RETURN v_reply;
END $$"""

# kv.incr in one statement: {value: text} or {nan: true} (the stored value or
# the sum is not a 64-bit decimal integer; nothing written).
KV_INCR = """
CREATE OR REPLACE FUNCTION kv_incr(
    p_key text, p_delta bigint, p_ttl double precision, p_request text,
    p_channel text, p_request_ttl double precision
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_now double precision;
    v_reply jsonb;
    v_touched text[];
    v_value bytea;
    v_version bigint;
    v_expires double precision;
    v_text text;
    v_sum numeric;
    v_rev bigint;
BEGIN
    -- Committed without waiting for the WAL flush, so the KV lock is not held
    -- through an fsync; the client waits for the flush after (kv.py: durable).
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM kv_lock_rows(ARRAY[p_key], '{}', '{}');
    v_now := kv_lock();
    IF p_request <> '' THEN
        SELECT reply INTO v_reply FROM request_ids
        WHERE family = 'kv.incr' AND id = p_request AND expires > v_now;
        IF v_reply IS NOT NULL THEN
            RETURN v_reply;
        END IF;
    END IF;
    v_touched := kv_expire_due(v_now, ARRAY[p_key], 100);
    SELECT value, version, expires INTO v_value, v_version, v_expires FROM kv
    WHERE key = p_key AND (expires IS NULL OR expires > v_now);
    IF v_version IS NULL THEN
        v_sum := p_delta;
        v_expires := v_now + p_ttl;
    ELSE
        v_text := encode(v_value, 'escape');
        IF v_text !~ '^[+-]?[0-9]+$'
           OR v_text::numeric NOT BETWEEN -9223372036854775808 AND 9223372036854775807 THEN
            PERFORM kv_notify(p_channel, v_touched);
            RETURN jsonb_build_object('nan', true);
        END IF;
        v_sum := v_text::numeric + p_delta;
    END IF;
    IF v_sum NOT BETWEEN -9223372036854775808 AND 9223372036854775807 THEN
        PERFORM kv_notify(p_channel, v_touched);
        RETURN jsonb_build_object('nan', true);
    END IF;
    v_rev := nextval('kv_revision');
    INSERT INTO kv (key, value, version, expires)
    VALUES (p_key, convert_to(v_sum::text, 'UTF8'), v_rev, v_expires)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version,
        expires = EXCLUDED.expires;
    INSERT INTO kv_changes (revision, key, kind, version, value)
    VALUES (v_rev, p_key, 'put', v_rev, convert_to(v_sum::text, 'UTF8'));
    v_reply := jsonb_build_object('value', v_sum::text);
    PERFORM request_remember('kv.incr', p_request, v_reply, v_now, p_request_ttl);
    PERFORM kv_notify(p_channel, v_touched);
    RETURN v_reply;
END $$"""

STATE_DDL: list[str] = [
    """CREATE TABLE IF NOT EXISTS lease_names (
        name text COLLATE "C" PRIMARY KEY
    )""",
    """CREATE TABLE IF NOT EXISTS lease_grants (
        id text COLLATE "C" PRIMARY KEY,
        name text COLLATE "C" NOT NULL,
        holder text NOT NULL,
        token bigint NOT NULL,
        expires double precision NOT NULL,
        data bytea NOT NULL,
        capacity integer NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS lease_grants_by_name ON lease_grants (name, token)",
    "CREATE INDEX IF NOT EXISTS lease_grants_expires ON lease_grants (expires)",
    """CREATE TABLE IF NOT EXISTS kv (
        key text COLLATE "C" PRIMARY KEY,
        value bytea NOT NULL,
        version bigint NOT NULL,
        expires double precision
    )""",
    "CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires) WHERE expires IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS kv_changes (
        revision bigint NOT NULL,
        key text COLLATE "C" NOT NULL,
        kind text NOT NULL,
        version bigint NOT NULL,
        value bytea,
        PRIMARY KEY (revision, key)
    )""",
    """CREATE TABLE IF NOT EXISTS kv_state (
        id integer PRIMARY KEY CHECK (id = 1),
        compacted bigint NOT NULL DEFAULT 0
    )""",
    "INSERT INTO kv_state (id, compacted) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    "CREATE SEQUENCE IF NOT EXISTS kv_revision AS bigint",
    """CREATE TABLE IF NOT EXISTS request_ids (
        family text NOT NULL,
        id text COLLATE "C" NOT NULL,
        reply jsonb NOT NULL,
        expires double precision NOT NULL,
        PRIMARY KEY (family, id)
    )""",
    "CREATE INDEX IF NOT EXISTS request_ids_expires ON request_ids (expires)",
    """CREATE TABLE IF NOT EXISTS stream_heads (
        stream text COLLATE "C" PRIMARY KEY,
        last_id bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS stream_entries (
        stream text COLLATE "C" NOT NULL,
        id bigint NOT NULL,
        data bytea NOT NULL,
        time double precision NOT NULL,
        PRIMARY KEY (stream, id)
    )""",
    """CREATE TABLE IF NOT EXISTS pubsub_payloads (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        data bytea NOT NULL,
        time double precision NOT NULL
    )""",
    KV_LOCK,
    KV_EXPIRE_DUE,
    KV_NOTIFY,
    REQUEST_REMEMBER,
    KV_LOCK_ROWS,
    KV_FAILED_COMPARE,
    KV_TXN,
    KV_INCR,
]
