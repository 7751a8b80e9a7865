-- The worker may write as a role that owns nothing and may create nothing
-- (docs/security.md): `energybus historian init --writer ROLE` grants it the rows it
-- needs, and a new month's partition, which only the owner of the parent table may
-- create, is made by this function with its owner's rights. It takes only the two
-- sample tables, so those rights cannot be turned to partitioning anything else, and
-- its search_path is fixed, so that no object of the caller's can stand in for one it
-- calls.
CREATE OR REPLACE FUNCTION energybus.ensure_partition(parent text, moment timestamptz)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    first_day timestamptz := date_trunc('month', moment AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name text := parent || '_' || to_char(first_day AT TIME ZONE 'UTC', 'YYYYMM');
BEGIN
    IF parent NOT IN ('measurement_samples', 'counter_samples') THEN
        RAISE EXCEPTION 'ensure_partition: % is not a sample table', parent;
    END IF;
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

REVOKE ALL ON FUNCTION energybus.ensure_partition(text, timestamptz) FROM PUBLIC;
