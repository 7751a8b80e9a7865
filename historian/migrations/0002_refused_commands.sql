-- Commands refused before they reach a source (retained, stale, outside an interlock,
-- unknown series, bad value) are on the record too: state 'refused', the refusal's
-- stable code in `code`, and a value that may be unknown (a payload that is not JSON).

ALTER TABLE energybus.command_logs DROP CONSTRAINT command_logs_state_check;
ALTER TABLE energybus.command_logs ADD CONSTRAINT command_logs_state_check
    CHECK (state IN ('refused', 'accepted', 'sent', 'confirmed', 'rejected', 'expired'));
ALTER TABLE energybus.command_logs ALTER COLUMN value DROP NOT NULL;
ALTER TABLE energybus.command_logs ADD COLUMN code text;

-- "Why did my battery not move?": the commands of one series, newest first.
CREATE INDEX command_logs_series
    ON energybus.command_logs (site, entity_type, entity_id, metric, accepted_at);
