// A few of a VEN's readings written on the energy bus by hand (docs/contract.md): each
// sample's `value`, Profile A (the bare JSON number, not retained), and its `last`,
// Profile B (value, unit, observed_at, quality; retained), both at QoS 1. No energybus
// process runs here: a worker's bus ingest (worker.bus_ingest, on by default) stores
// every `value` in its historians. Profile A carries no time, so the historian stores
// such a value at the time the worker received it, with quality `degraded`; the
// retained `last` keeps the VEN's own time.
const SITE = "@@SITE@@";
// [VEN field, entity type, entity id after the VEN's, metric, unit, sent in kW]
const READINGS = [
    ["usedPowerKw", "load", "", "active_power", "W", true],
    ["batterySOC", "storage", "-battery", "soc", "%", false],
    ["panelVoltage", "grid", "-panel", "voltage", "V", false],
];

// Lower case, and each run of other characters one "-": kebab-case, or "" for an id
// with no letter or digit (that one's readings are skipped).
function kebab(text) {
    return String(text).toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
}

// kW to W through the decimal text, as energybus converts: 1.1 kW is 1100 W, not
// 1100.0000000000002 W.
function watts(kw) {
    const [digits, exponent = "0"] = String(kw).split("e");
    return Number(`${digits}e${Number(exponent) + 3}`);
}

function translate(msg) {
    let ven;
    try {
        ven = JSON.parse(msg.payload);
    } catch (error) {
        ven = null;
    }
    if (!ven || typeof ven.venId !== "string") {
        node.warn(`not a VEN metering message on ${msg.topic}`);
        return [];
    }
    const timed = typeof ven.timestamp === "number";
    const observed_at = new Date(timed ? ven.timestamp * 1000 : Date.now()).toISOString();
    const quality = timed ? "good" : "degraded";
    const out = [];
    function sample(type, entity, metric, unit, value) {
        if (!entity || typeof value !== "number" || !Number.isFinite(value)) return;
        const series = `${SITE}/energy/${type}/${entity}/${metric}`;
        const last = { value, unit, observed_at, quality };
        out.push({ topic: `${series}/value`, payload: JSON.stringify(value), qos: 1, retain: false });
        out.push({ topic: `${series}/last`, payload: JSON.stringify(last), qos: 1, retain: true });
    }
    const ven_id = kebab(ven.venId);
    for (const [field, type, suffix, metric, unit, kw] of READINGS) {
        const value = ven[field];
        sample(type, ven_id && ven_id + suffix, metric, unit, kw && typeof value === "number" ? watts(value) : value);
    }
    for (const circuit of Array.isArray(ven.circuits) ? ven.circuits : []) {
        if (circuit && typeof circuit.currentKw === "number") {
            sample("load", kebab(circuit.id), "active_power", "W", watts(circuit.currentKw));
        }
    }
    return out;
}

context.set("translate", translate);
