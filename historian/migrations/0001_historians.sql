-- The measurement and counter historians and the command records.
--
-- Both sample tables are range-partitioned by month on observed_at (partitions are
-- created ahead of the rows by energybus.ensure_partition), keyed by
-- (site, device_id, metric_name, observed_at) so that a redelivered sample changes
-- nothing, with a BRIN index on observed_at for scans across devices.

CREATE TABLE energybus.measurements (
    site        text             NOT NULL,
    device_id   text             NOT NULL,
    metric_name text             NOT NULL,
    observed_at timestamptz      NOT NULL,
    value       double precision NOT NULL,
    quality     text             NOT NULL DEFAULT 'good',
    ingested_at timestamptz      NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (site, device_id, metric_name, observed_at)
) PARTITION BY RANGE (observed_at);

CREATE INDEX measurements_observed_brin ON energybus.measurements USING brin (observed_at);

-- Raw cumulative readings of *_total metrics, exactly as the source reported them, in
-- the same columns as measurements.
-- Deltas, resets, rollovers and jumps are derived on read (see counter_deltas), so the
-- answer depends only on the stored rows, never on which worker wrote them or in what
-- order they arrived.
CREATE TABLE energybus.counter_readings (
    LIKE energybus.measurements INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (site, device_id, metric_name, observed_at)
) PARTITION BY RANGE (observed_at);

CREATE INDEX counter_readings_observed_brin ON energybus.counter_readings USING brin (observed_at);

-- What is declared about a counter: the value at which its register wraps to zero
-- (wrap_at, in the metric's canonical unit) and the largest plausible rate of increase
-- (max_rate, canonical unit per second). '*' in site or device_id declares a default;
-- the most specific declaration wins.
CREATE TABLE energybus.counter_series (
    site        text NOT NULL DEFAULT '*',
    device_id   text NOT NULL DEFAULT '*',
    metric_name text NOT NULL,
    wrap_at     double precision CHECK (wrap_at > 0),
    max_rate    double precision CHECK (max_rate > 0),
    PRIMARY KEY (site, device_id, metric_name)
);

-- The command state machine's records; one row per command, moved forward only.
CREATE TABLE energybus.command_logs (
    id              text        PRIMARY KEY,
    adapter         text        NOT NULL,
    site            text        NOT NULL,
    entity_type     text        NOT NULL,
    entity_id       text        NOT NULL,
    metric          text        NOT NULL,
    value           jsonb       NOT NULL,
    target          text        NOT NULL,
    action          text        NOT NULL,
    payload         jsonb,
    state           text        NOT NULL
        CHECK (state IN ('accepted', 'sent', 'confirmed', 'rejected', 'expired')),
    accepted_at     timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    sent_at         timestamptz,
    acked_at        timestamptz,
    response_status text,
    reason          text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX command_logs_accepted ON energybus.command_logs (accepted_at);

-- accepted < sent < an outcome: a record never moves back, whatever order the
-- snapshots of one command reach the database in.
CREATE FUNCTION energybus.command_rank(state text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE state WHEN 'accepted' THEN 0 WHEN 'sent' THEN 1 ELSE 2 END $$;

-- The monthly partition of a sample table that holds moment; created when missing.
-- Serialized by an advisory lock so that workers racing for a new month do not fail.
CREATE FUNCTION energybus.ensure_partition(parent text, moment timestamptz)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    first_day timestamptz := date_trunc('month', moment AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name text := parent || '_' || to_char(first_day AT TIME ZONE 'UTC', 'YYYYMM');
BEGIN
    IF to_regclass('energybus.' || name) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('energybus.ensure_partition'));
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS energybus.%I PARTITION OF energybus.%I FOR VALUES FROM (%L) TO (%L)',
        name, parent, first_day, first_day + interval '1 month'
    );
END
$$;

-- The declaration that applies to one counter series (the most specific one).
CREATE FUNCTION energybus.counter_declaration(
    p_site text, p_device text, p_metric text,
    OUT wrap_at double precision, OUT max_rate double precision
)
LANGUAGE sql STABLE
AS $$
    SELECT s.wrap_at, s.max_rate
    FROM energybus.counter_series s
    WHERE s.metric_name = p_metric
      AND s.site IN (p_site, '*')
      AND s.device_id IN (p_device, '*')
    ORDER BY (s.site = '*'), (s.device_id = '*')
    LIMIT 1
$$;

-- Each reading of one counter with what it added since the reading before it.
--
-- For consecutive readings prev -> cur, with d = cur - prev:
--   d >= 0                           'count'    adds d
--   d < 0, wrap_at declared and the wrapped delta cur + wrap_at - prev is plausible
--                                    'rollover' adds cur + wrap_at - prev
--   d < 0 otherwise                  'reset'    adds cur (the counter restarted at 0)
--   any delta above max_rate * seconds between the readings
--                                    'jump'     adds nothing (reported, not counted)
-- "Plausible" for a wrap means within max_rate when declared, else under half the
-- register. The reading before p_from is included so the first delta in the range is
-- known; it is returned with delta NULL and event 'start'.
CREATE FUNCTION energybus.counter_deltas(
    p_site text, p_device text, p_metric text, p_from timestamptz, p_to timestamptz
)
RETURNS TABLE (
    site text, observed_at timestamptz, value double precision,
    previous double precision, delta double precision, event text
)
LANGUAGE sql STABLE
AS $$
    WITH series AS (
        SELECT DISTINCT r.site
        FROM energybus.counter_readings r
        WHERE (p_site IS NULL OR r.site = p_site)
          AND r.device_id = p_device AND r.metric_name = p_metric
          AND r.observed_at >= p_from AND r.observed_at < p_to
    ),
    readings AS (
        SELECT r.site, r.observed_at, r.value
        FROM energybus.counter_readings r JOIN series USING (site)
        WHERE r.device_id = p_device AND r.metric_name = p_metric
          AND r.observed_at >= p_from AND r.observed_at < p_to
        UNION ALL
        SELECT s.site, b.observed_at, b.value
        FROM series s
        CROSS JOIN LATERAL (
            SELECT r.observed_at, r.value
            FROM energybus.counter_readings r
            WHERE r.site = s.site AND r.device_id = p_device AND r.metric_name = p_metric
              AND r.observed_at < p_from
            ORDER BY r.observed_at DESC
            LIMIT 1
        ) b
    ),
    paired AS (
        SELECT r.site, r.observed_at, r.value,
               lag(r.value) OVER w AS previous,
               extract(epoch FROM r.observed_at - lag(r.observed_at) OVER w) AS seconds,
               d.wrap_at, d.max_rate
        FROM readings r
        CROSS JOIN LATERAL energybus.counter_declaration(r.site, p_device, p_metric) d
        WINDOW w AS (PARTITION BY r.site ORDER BY r.observed_at)
    ),
    classified AS (
        SELECT p.*,
               CASE
                   WHEN p.previous IS NULL THEN 'start'
                   WHEN p.value >= p.previous THEN 'count'
                   WHEN p.wrap_at IS NOT NULL
                        AND p.value + p.wrap_at - p.previous
                            <= coalesce(p.max_rate * p.seconds, p.wrap_at / 2) THEN 'rollover'
                   ELSE 'reset'
               END AS kind
        FROM paired p
    ),
    measured AS (
        SELECT c.*,
               CASE c.kind
                   WHEN 'start' THEN NULL
                   WHEN 'count' THEN c.value - c.previous
                   WHEN 'rollover' THEN c.value + c.wrap_at - c.previous
                   ELSE c.value
               END AS raw_delta
        FROM classified c
    )
    SELECT m.site, m.observed_at, m.value, m.previous,
           CASE WHEN m.max_rate IS NOT NULL AND m.raw_delta > m.max_rate * m.seconds
                THEN 0 ELSE m.raw_delta END,
           CASE WHEN m.max_rate IS NOT NULL AND m.raw_delta > m.max_rate * m.seconds
                THEN 'jump' ELSE m.kind END
    FROM measured m
    ORDER BY m.site, m.observed_at
$$;

-- Resets, rollovers and jumps of one counter in [p_from, p_to).
CREATE FUNCTION energybus.counter_events(
    p_site text, p_device text, p_metric text, p_from timestamptz, p_to timestamptz
)
RETURNS TABLE (
    site text, observed_at timestamptz, event text,
    previous double precision, value double precision, delta double precision
)
LANGUAGE sql STABLE
AS $$
    SELECT d.site, d.observed_at, d.event, d.previous, d.value, d.delta
    FROM energybus.counter_deltas(p_site, p_device, p_metric, p_from, p_to) d
    WHERE d.event IN ('reset', 'rollover', 'jump')
$$;

-- Energy (the counter's increase) per interval of p_every from p_from, correct across
-- resets and rollovers. A delta belongs to the interval of the later reading. Every
-- interval is returned, with readings = 0 where there were none; with p_site NULL, the
-- device's series of every site are summed.
CREATE FUNCTION energybus.counter_energy(
    p_site text, p_device text, p_metric text,
    p_from timestamptz, p_to timestamptz, p_every interval
)
RETURNS TABLE (
    bucket_start timestamptz, bucket_end timestamptz, energy double precision,
    readings bigint, resets bigint, rollovers bigint, jumps bigint
)
LANGUAGE sql STABLE
AS $$
    WITH buckets AS (
        SELECT g AS bucket_start, least(g + p_every, p_to) AS bucket_end
        FROM generate_series(p_from, p_to - interval '1 microsecond', p_every) g
    )
    SELECT b.bucket_start, b.bucket_end,
           coalesce(sum(d.delta), 0),
           count(d.observed_at),
           count(*) FILTER (WHERE d.event = 'reset'),
           count(*) FILTER (WHERE d.event = 'rollover'),
           count(*) FILTER (WHERE d.event = 'jump')
    FROM buckets b
    LEFT JOIN energybus.counter_deltas(p_site, p_device, p_metric, p_from, p_to) d
        ON d.observed_at >= b.bucket_start AND d.observed_at < b.bucket_end
           AND d.event <> 'start'
    GROUP BY b.bucket_start, b.bucket_end
    ORDER BY b.bucket_start
$$;
