// energybus's VEN adapter written by hand (mappings/ven.toml and energybus's renderer),
// set up once here; the function itself calls translate() per message. One VEN metering
// message in; out, for every sample, its canonical `value` (Profile A, deduped with a
// 60 s heartbeat) and its retained `last` (Profile B envelope), byte for byte as energybus
// publishes them. A broken message is dead-lettered whole, an implausible value alone.
// Not published: `meta` and `availability`.
const SITE = "@@SITE@@";
const WORKER = "@@CLIENT_ID@@";
const DEAD = "energybus/dead_letter/ven";
const HEARTBEAT_US = 60e6; // max_interval_s = 60, in microseconds of observation time
const KW = 1, W = [-1e10, 1e10], A = [-1e6, 1e6], V = [-2e6, 2e6], P = [-1000, 1000];
// [field, entity type, entity id suffix, metric, unit, kW?, plausible range]
const ROOT = [
    ["usedPowerKw", "load", "", "active_power", "W", KW, W],
    ["shedPowerKw", "load", "", "shed_power", "W", KW, W],
    ["requestedReductionKw", "load", "", "requested_reduction_power", "W", KW, W],
    ["baselinePowerKw", "load", "", "baseline_power", "W", KW, W],
    ["batterySOC", "storage", "-battery", "soc", "%", 0, P],
    ["panelVoltage", "grid", "-panel", "voltage", "V", 0, V],
    ["currentAmps", "grid", "-panel", "current", "A", 0, A],
    ["panelUtilizationPercent", "grid", "-panel", "utilization", "%", 0, P],
];
const CIRCUIT = [
    ["currentKw", "load", "", "active_power", "W", KW, W],
    ["currentAmps", "load", "", "current", "A", 0, A],
    ["enabled", "load", "", "enabled", null, 0, null],
];
const LOAD = [["shedCapabilityKw", "load", "", "shed_capability_power", "W", KW, W]];
// Static fields (energybus puts them in `meta`): type-checked only; [field, kW?]
const ROOT_META = [["panelAmperageRating", 0], ["panelMaxKw", KW]];
const CIRCUIT_META = [["name", 0], ["breakerAmps", 0], ["critical", 0]];
const LOAD_META = [["name", 0], ["type", 0], ["capacityKw", KW], ["priority", 0]];
const ARRAYS = [["circuits", "id", CIRCUIT, CIRCUIT_META], ["loads", "loadId", LOAD, LOAD_META]];

// What was last emitted per series (by topic base), the last timestamps per VEN (to
// translate a message sent twice once), and the entity id of every item id seen.
const state = { series: new Map(), vens: new Map(), ids: new Map() };

class Refused extends Error {
    constructor(reason, message, path) { super(message); this.reason = reason; this.path = path; }
}

// Numbers as energybus (msgspec) writes them: shortest round-trip digits, fixed notation
// from 1e-5 to 1e16 (always with a decimal point), else "1.5e16" or "2.5e-7".
function num(v) {
    if (v === 0) return Object.is(v, -0) ? "-0.0" : "0.0";
    const [m, e] = v.toExponential().split("e");
    if (+e < -5 || +e >= 16) return m + "e" + (+e);
    const s = String(v);
    return s.includes(".") ? s : s + ".0";
}

// kW -> W through the decimal text, as energybus does: 1.1 kW is 1100.0 W, not 1100.0000000000002.
function kw(v) {
    const scaled = v * 1000;
    if (scaled > -1e12 && scaled < 1e12) {
        const whole = Math.round(scaled);
        if (whole / 1000 === v) return whole + 0; // + 0: no -0
    }
    const [m, e] = v.toExponential().split("e");
    return Number(m + "e" + (+e + 3));
}

// energybus's to_kebab: circuit_1 -> circuit-1, batterySOC -> battery-soc, Küche -> kuche.
function kebab(text, path) {
    const ascii = text.normalize("NFKD").replace(/[^\x00-\x7f]/g, "");
    const words = ascii.replace(/(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])/g, " ").match(/[A-Za-z0-9]+/g);
    if (!words) throw new Refused("bad_identifier", "no letters or digits to build a kebab-case id from", path);
    return words.join("-").toLowerCase();
}

// Unix seconds -> [whole seconds, microseconds], rounded half to even as Python's datetime does.
function unix(t) {
    let s = Math.trunc(t), f = (t - s) * 1e6, us = Math.round(f);
    if (Math.abs(f % 1) === 0.5 && us % 2 !== 0) us -= 1;
    if (us >= 1e6) { us -= 1e6; s += 1; } else if (us < 0) { us += 1e6; s -= 1; }
    if (!(s >= -62135596800 && s < 253402300800)) throw new Refused("bad_timestamp", "timestamp is not a time in Unix seconds", "$.timestamp");
    return [s, us];
}

function iso(s, us) {
    const text = new Date(s * 1000).toISOString().slice(0, 19);
    return us ? text + "." + String(us).padStart(6, "0") + "Z" : text + "Z";
}

function kind(value, path, want) { // want: number, boolean, string, key (int | str) or static
    const t = typeof value;
    if (t === "number" && !Number.isFinite(value)) throw new Refused("non_finite", "number is out of the range of a finite double", path);
    if (value === null && want !== "string" && want !== "key") return;
    if (t === want || (want === "static" && (t === "string" || t === "number" || t === "boolean"))
        || (want === "key" && (t === "string" || Number.isInteger(value)))) return;
    const expected = { string: "str", key: "int | str", static: "str | int | float | bool | null" }[want] || want + " | null";
    throw new Refused("wrong_type", `expected ${expected}, got ${typeName(value)}`, path);
}

function object(value, path) {
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
        throw new Refused("wrong_type", `expected object, got ${typeName(value)}`, path);
    }
}

// The type of every field read, as energybus's decoder checks them (in document order).
const ROOT_TYPES = types(ROOT, ROOT_META, [["venId", "string"], ["timestamp", "number"], ["circuits", "array"], ["loads", "array"]]);
const ITEM_TYPES = ARRAYS.map(([, key, fields, statics]) => types(fields, statics, [[key, "key"]]));
function types(fields, statics, more) {
    return new Map([...fields.map(([f, , , , unit]) => [f, unit ? "number" : "boolean"]), ...statics.map(([f]) => [f, "static"]), ...more]);
}

function typeName(value) {
    return value === null ? "null" : Array.isArray(value) ? "array" : typeof value;
}

// Check the whole message's types first, as energybus's decoder does: a broken message
// publishes nothing.
function check(m) {
    object(m, "$");
    for (const name in m) {
        const want = ROOT_TYPES.get(name);
        if (want === "array") array(m[name], name);
        else if (want) kind(m[name], "$." + name, want);
    }
    if (m.venId === undefined) throw new Refused("missing_field", "object missing required field `venId`", "$.venId");
}

function array(items, each) {
    if (items === null) return;
    if (!Array.isArray(items)) throw new Refused("wrong_type", `expected array | null, got ${typeName(items)}`, "$." + each);
    const a = ARRAYS.findIndex(([name]) => name === each), key = ARRAYS[a][1], wanted = ITEM_TYPES[a];
    items.forEach((item, i) => {
        const at = `$.${each}[${i}]`;
        object(item, at);
        for (const name in item) {
            const want = wanted.get(name);
            if (want) kind(item[name], `${at}.${name}`, want);
        }
        if (item[key] === undefined) throw new Refused("missing_field", `object missing required field \`${key}\``, `${at}.${key}`);
    });
}

// What else rejects a whole message, before anything is published: a static field that
// cannot be converted, an item id that gives no entity id. The items' entity ids, by array.
function prepare(m) {
    for (const [f, k] of ROOT_META) if (k && typeof m[f] === "number") finite(m[f], "$." + f);
    return ARRAYS.map(([each, key, , statics]) => (m[each] || []).map((item, i) => {
        const at = `$.${each}[${i}]`;
        let entity = state.ids.get(item[key]);
        if (entity === undefined) {
            entity = kebab(String(item[key]), at);
            if (state.ids.size >= 4096) state.ids.clear();
            state.ids.set(item[key], entity);
        }
        for (const [f, k] of statics) if (k && typeof item[f] === "number") finite(item[f], `${at}.${f}`);
        return entity;
    }));
}

function finite(v, path) {
    if (!Number.isFinite(kw(v))) throw new Refused("non_finite", "value is out of the range of a finite number once converted", path);
}

function where(each, index, field) {
    return each ? `$.${each}[${index}].${field}` : "$." + field;
}

// The `value` and `last` messages of one entity's fields; `t` is the message's time and output.
function emit(rows, obj, id, each, index, t) {
    for (const [f, type, suffix, metric, unit, k, range] of rows) {
        let v = obj[f];
        if (v === undefined || v === null) continue;
        if (unit) {
            if (k) v = kw(v);
            if (!Number.isFinite(v)) { t.refusals.push(["non_finite", "value is out of the range of a finite number once converted", where(each, index, f)]); continue; }
            if (!(v >= range[0] && v <= range[1])) { t.refusals.push(["implausible_value", `${metric} is outside its plausible range [${range[0]}, ${range[1]}] ${unit}`, where(each, index, f)]); continue; }
        }
        const base = `${SITE}/energy/${type}/${id}${suffix}/${metric}/`;
        let s = state.series.get(base);
        if (!s) { s = { value: undefined, quality: "", at: -Infinity, last: -Infinity }; state.series.set(base, s); }
        const text = unit ? num(v) : (v ? "true" : "false");
        const changed = s.value !== v || s.quality !== t.quality || t.observed - s.at >= HEARTBEAT_US;
        if (changed) {
            s.value = v; s.quality = t.quality; s.at = t.observed;
            t.out.push({ topic: base + "value", payload: text, retain: false });
        }
        if (t.observed >= s.last) {
            s.last = t.observed;
            const u = unit ? `,"unit":"${unit}"` : "";
            t.out.push({ topic: base + "last", payload: `{"value":${text}${u}${t.tail}`, retain: true });
        }
    }
}

// One metering message (its topic and JSON text) -> the messages to publish, in order.
function translate(topic, payload) {
    const out = [];
    const refusals = [];
    try {
        let m;
        try { m = JSON.parse(payload); } catch (e) { throw new Refused("malformed_json", "JSON is malformed", "$"); }
        check(m);
        const ven = m.venId;
        let known = state.vens.get(ven);
        if (!known) {
            known = { id: kebab(ven, "$.venId"), recent: [], seen: new Set() };
            state.vens.set(ven, known);
        }
        let sec, us, quality = "good";
        const ts = m.timestamp;
        if (ts === undefined || ts === null) {
            const now = Date.now(); // no timestamp: the receive time (to the millisecond)
            sec = Math.floor(now / 1000); us = (now - sec * 1000) * 1000;
            quality = "degraded";
        } else {
            if (known.seen.has(ts)) return []; // the same message again (ven/telemetry): once
            [sec, us] = unix(ts);
        }
        const ids = prepare(m);
        const t = { observed: sec * 1e6 + us, quality, tail: `,"observed_at":"${iso(sec, us)}","quality":"${quality}"}`, out, refusals };
        emit(ROOT, m, known.id, null, 0, t);
        ARRAYS.forEach(([each, , fields], a) => {
            const items = m[each];
            if (items) for (let i = 0; i < items.length; i++) emit(fields, items[i], ids[a][i], each, i, t);
        });
        if (ts !== undefined && ts !== null && !refusals.length) {
            known.recent.push(ts); known.seen.add(ts);
            if (known.recent.length > 16) known.seen.delete(known.recent.shift());
        }
    } catch (e) {
        if (!(e instanceof Refused)) throw e;
        out.length = 0;
        refusals.length = 0;
        refusals.push([e.reason, e.message, e.path]);
    }
    if (refusals.length) {
        const [reason, message, path] = refusals[0];
        const letter = { reason, message, source: "ven", topic, received_at: new Date().toISOString(), worker: WORKER };
        if (path) letter.path = path;
        if (refusals.length > 1) letter.refusals = refusals.map(([r, m, p]) => (p ? { reason: r, message: m, path: p } : { reason: r, message: m }));
        letter.payload = String(payload);
        out.push({ topic: DEAD, payload: JSON.stringify(letter), retain: false });
    }
    return out;
}

context.set("ven", translate);
