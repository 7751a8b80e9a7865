// One long-running `energybus normalize --stream` per adapter, started here with Node.js's
// child_process (a command and a list of arguments: no shell). Each message is one JSON
// line on its standard input, {"topic", "payload", "retain"}: JSON.stringify escapes the
// payload's quotes, backslashes and line breaks, so any payload is one line and arrives
// whole. Each line of its standard output is one canonical message for mqtt out; each
// line of its standard error one refusal, `error: line <n>: <code>: <message>`, which
// becomes a dead letter as the worker writes them (docs/worker.md). One process keeps
// energybus's state from message to message: dedupe with heartbeat, a VEN message
// translated once, CPI's replay protection.
const COMMAND = "energybus";
const CONFIG = "@@CONFIG@@";
const WORKER = "@@CLIENT_ID@@";
const ADAPTERS = [["volttron/", "ven"], ["cpi/", "cpi"]];
const RESTART_S = 2;
// Inputs kept per process, so that a refused one's dead letter carries its payload; and
// at most this many wait while a process starts again.
const REMEMBER = 10000;
const REFUSAL = /^error: line (\d+): ([a-z0-9_]+): (.*?)(?: \(at (\$[^)]*)\))?$/;
const processes = new Map(ADAPTERS.map(([, adapter]) => [adapter, { child: null, waiting: [] }]));
let stopping = false;

// Calls each() with every whole line of buffer; returns the rest.
function lines(buffer, each) {
    for (let end = buffer.indexOf(10); end >= 0; end = buffer.indexOf(10)) {
        const line = buffer.subarray(0, end).toString("utf8");
        buffer = buffer.subarray(end + 1);
        if (line) each(line);
    }
    return buffer;
}

function start(adapter) {
    const proc = processes.get(adapter);
    const args = ["normalize", "--adapter", adapter, "--config", CONFIG, "--stream"];
    const child = child_process.spawn(COMMAND, args, { stdio: "pipe" });
    let out = Buffer.alloc(0);
    let err = Buffer.alloc(0);
    Object.assign(proc, { child, line: 0, inputs: new Map() });
    child.stdout.on("data", (chunk) => {
        out = lines(Buffer.concat([out, chunk]), (line) => {
            const { topic, payload, qos, retain } = JSON.parse(line);
            node.send({ topic, payload, qos, retain });
        });
    });
    child.stderr.on("data", (chunk) => {
        err = lines(Buffer.concat([err, chunk]), (line) => refused(adapter, proc, line));
    });
    child.stdin.on("error", () => {}); // the process has gone; "close" says why
    child.on("error", (error) => node.error(`${COMMAND}: ${error.message}`));
    child.on("close", (code, signal) => {
        proc.child = null;
        if (stopping) return;
        node.error(`${COMMAND} normalize --adapter ${adapter} ended (${signal || "exit status " + code}); starting it again in ${RESTART_S} s`);
        setTimeout(() => stopping || start(adapter), RESTART_S * 1000);
    });
    for (const input of proc.waiting.splice(0)) write(proc, input);
}

function write(proc, input) {
    proc.line += 1;
    proc.inputs.set(proc.line, input);
    proc.inputs.delete(proc.line - REMEMBER);
    const { topic, payload, retain } = input;
    proc.child.stdin.write(JSON.stringify({ topic, payload, retain }) + "\n");
}

function refused(adapter, proc, line) {
    const match = REFUSAL.exec(line);
    if (!match) return node.error(`${COMMAND} normalize --adapter ${adapter}: ${line}`);
    const [, number, reason, message, path] = match;
    const input = proc.inputs.get(Number(number)) || {};
    const letter = { reason, message, source: adapter, topic: input.topic };
    Object.assign(letter, { received_at: input.received_at, worker: WORKER });
    if (path) letter.path = path;
    letter.payload = input.payload;
    const topic = `energybus/dead_letter/${adapter}`;
    node.send({ topic, payload: JSON.stringify(letter), qos: 1, retain: false });
}

function feed(msg) {
    const found = ADAPTERS.find(([prefix]) => msg.topic.startsWith(prefix));
    if (!found) return node.warn(`no adapter for ${msg.topic}`);
    const proc = processes.get(found[1]);
    const input = { topic: msg.topic, payload: msg.payload, retain: msg.retain === true };
    input.received_at = new Date().toISOString();
    if (proc.child) write(proc, input);
    else if (proc.waiting.length < REMEMBER) proc.waiting.push(input);
    else node.error(`${msg.topic}: dropped, ${REMEMBER} messages already wait for energybus`);
}

processes.forEach((proc, adapter) => start(adapter));
context.set("feed", feed);
context.set("stop", () => {
    stopping = true;
    processes.forEach((proc) => proc.child && proc.child.kill());
});
