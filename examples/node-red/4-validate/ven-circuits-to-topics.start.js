// A VEN's circuits on the energy bus, named by this site's own table: the active power
// of each as `value` (Profile A) and `last` (Profile B), as in 3-publish. A circuit the
// table does not name keeps the VEN's id as its entity id, which need not be a valid
// one (`circuit_9`: kebab-case has no "_"): the next node checks every topic with
// energybus validate and publishes only valid ones, so a missing name shows up as a
// dead letter saying what is wrong, not as a broken topic on the bus.
const SITE = "@@SITE@@";
const ENTITIES = { circuit_1: "main-hvac", circuit_3: "pool-pump" };

function translate(msg) {
    let ven;
    try {
        ven = JSON.parse(msg.payload);
    } catch (error) {
        ven = null;
    }
    const circuits = ven && Array.isArray(ven.circuits) ? ven.circuits : null;
    if (!circuits) {
        node.warn(`no circuits in the message on ${msg.topic}`);
        return [];
    }
    const timed = typeof ven.timestamp === "number";
    const observed_at = new Date(timed ? ven.timestamp * 1000 : Date.now()).toISOString();
    const quality = timed ? "good" : "degraded";
    const out = [];
    for (const circuit of circuits) {
        const kw = circuit && circuit.currentKw;
        if (typeof kw !== "number" || !Number.isFinite(kw)) continue;
        const entity = ENTITIES[circuit.id] || String(circuit.id);
        const series = `${SITE}/energy/load/${entity}/active_power`;
        // kW to W through the decimal text, as energybus converts (1.1 kW is 1100 W).
        const [digits, exponent = "0"] = String(kw).split("e");
        const value = Number(`${digits}e${Number(exponent) + 3}`);
        const last = { value, unit: "W", observed_at, quality };
        out.push({ topic: `${series}/value`, payload: JSON.stringify(value), qos: 1, retain: false });
        out.push({ topic: `${series}/last`, payload: JSON.stringify(last), qos: 1, retain: true });
    }
    return out;
}

context.set("translate", translate);
