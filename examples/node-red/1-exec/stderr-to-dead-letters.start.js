// energybus refuses a message with exit status 1 and one line on standard error per
// refusal, `error: <code>: <message>` and ` (at <path>)` when it has one: each becomes
// a dead letter as the worker writes them (docs/worker.md), with the original message.
// Any other exit is the flow's own trouble (energybus not found, a broken
// configuration, killed after the exec node's time-out): an error in Node-RED's log.
const WORKER = "@@CLIENT_ID@@";
const REFUSAL = /^error: ([a-z0-9_]+): (.*?)(?: \(at (\$[^)]*)\))?$/;
const errors = new Map();

function letters(msg) {
    const id = msg._msgid;
    if (typeof msg.payload === "string" || Buffer.isBuffer(msg.payload)) {
        errors.set(id, Buffer.concat([errors.get(id) || Buffer.alloc(0), Buffer.from(msg.payload)]));
        return [];
    }
    const text = (errors.get(id) || Buffer.alloc(0)).toString("utf8").trim();
    errors.delete(id);
    const { code, signal } = msg.payload;
    if (code === 0) return [];
    const source = msg.energybus;
    const lines = text.split("\n");
    if (code !== 1 || !lines.every((line) => REFUSAL.test(line))) {
        node.error(`energybus normalize: ${signal || "exit status " + code} for ${source.topic}: ${text}`);
        return [];
    }
    return lines.map((line) => {
        const [, reason, message, path] = REFUSAL.exec(line);
        const letter = { reason, message, source: source.adapter, topic: source.topic };
        Object.assign(letter, { received_at: source.received_at, worker: WORKER });
        if (path) letter.path = path;
        letter.payload = source.payload;
        const topic = `energybus/dead_letter/${source.adapter}`;
        return { topic, payload: JSON.stringify(letter), qos: 1, retain: false };
    });
}

context.set("letters", letters);
