// One energybus process per message, a few at a time: each is a Python start-up, so more
// processes than cores only wait for the CPU, and a burst of messages must not start
// thousands at once. The exec node's third output (the exit code) comes back here and
// frees a place.
const RUNNING_MAX = 2;
const WAITING_MAX = 10000;
// Linux takes at most 128 KiB in one argument; a larger message cannot go through exec.
const ARGUMENT_MAX = 131000;
const ADAPTERS = [["volttron/", "ven"], ["cpi/", "cpi"]];
const waiting = [];
let running = 0;
let dropped = 0;

// The exec node appends msg.args to its command: the adapter, and the message as
// `energybus normalize --input-base64` reads it, one --stream line in base64. Base64 has
// no white space and no quotes, so the exec node's spawn mode passes it on as one
// argument, unchanged, and no shell ever sees it.
function prepare(msg) {
    const found = ADAPTERS.find(([prefix]) => msg.topic.startsWith(prefix));
    if (!found) {
        node.warn(`no adapter for ${msg.topic}`);
        return null;
    }
    const line = JSON.stringify({ topic: msg.topic, payload: msg.payload, retain: msg.retain === true });
    const encoded = Buffer.from(line, "utf8").toString("base64");
    if (encoded.length > ARGUMENT_MAX) {
        node.error(`${msg.topic}: a message this large cannot be one argument; see 2-stream`);
        return null;
    }
    const received_at = new Date().toISOString();
    return {
        topic: msg.topic,
        args: `--adapter ${found[1]} --input-base64 ${encoded}`,
        energybus: { adapter: found[1], topic: msg.topic, payload: msg.payload, received_at },
    };
}

function queue(msg) {
    if (msg.energybus) {
        running -= 1; // a process has ended
    } else {
        const job = prepare(msg);
        if (job && waiting.length < WAITING_MAX) {
            waiting.push(job);
        } else if (job && ++dropped % 1000 === 1) {
            node.warn(`${dropped} messages dropped: ${WAITING_MAX} already waiting`);
        }
    }
    const out = [];
    while (running < RUNNING_MAX && waiting.length) {
        running += 1;
        out.push(waiting.shift());
    }
    node.status({ text: `${running} running, ${waiting.length} waiting, ${dropped} dropped` });
    return out;
}

context.set("queue", queue);
