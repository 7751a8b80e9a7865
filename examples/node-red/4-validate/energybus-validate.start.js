// Every message's topic checked by one long-running `energybus validate --json -`,
// started here with Node.js's child_process (a command and a list of arguments: no
// shell): one topic a line on its standard input, one JSON result a line back, in the
// same order. A message whose topic is valid goes on to mqtt out; any other becomes a
// dead letter on energybus/dead_letter/nodered with energybus's reason code and
// message (docs/errors.md), and is not published.
const COMMAND = "energybus";
const WORKER = "@@CLIENT_ID@@";
const DEAD = "energybus/dead_letter/nodered";
const RESTART_S = 2;
const sent = []; // messages whose topics are with the process, oldest first
const waiting = []; // messages that came while it was starting again
let child = null;
let stopping = false;

function refuse(msg, code, message) {
    const letter = { reason: code, message, source: "nodered", topic: msg.topic };
    Object.assign(letter, { received_at: new Date().toISOString(), worker: WORKER });
    letter.payload = String(msg.payload);
    node.send({ topic: DEAD, payload: JSON.stringify(letter), qos: 1, retain: false });
}

function answer(line) {
    const result = JSON.parse(line);
    const msg = sent.shift();
    if (result.valid) node.send(msg);
    else refuse(msg, result.error.code, result.error.message);
}

function start() {
    child = child_process.spawn(COMMAND, ["validate", "--json", "-"], { stdio: "pipe" });
    const mine = child;
    let out = Buffer.alloc(0);
    mine.stdout.on("data", (chunk) => {
        out = Buffer.concat([out, chunk]);
        for (let end = out.indexOf(10); end >= 0; end = out.indexOf(10)) {
            answer(out.subarray(0, end).toString("utf8"));
            out = out.subarray(end + 1);
        }
    });
    mine.stderr.on("data", (chunk) => node.error(`${COMMAND} validate: ${chunk}`));
    mine.stdin.on("error", () => {}); // the process has gone; "close" says why
    mine.on("error", (error) => node.error(`${COMMAND}: ${error.message}`));
    mine.on("close", (code, signal) => {
        child = null;
        waiting.unshift(...sent.splice(0)); // not answered: checked again
        if (stopping) return;
        node.error(`${COMMAND} validate ended (${signal || "exit status " + code}); starting it again in ${RESTART_S} s`);
        setTimeout(() => stopping || start(), RESTART_S * 1000);
    });
    waiting.splice(0).forEach(check);
}

function check(msg) {
    const topic = typeof msg.topic === "string" ? msg.topic : "";
    // energybus validate skips blank lines, and a line break cannot travel inside a line:
    // it goes as "\n" (or "\r"), which breaks the same rule of the same level.
    if (!topic) return refuse(msg, "empty", "the topic is empty");
    if (!child) return void waiting.push(msg);
    sent.push(msg);
    child.stdin.write(topic.replace(/\r/g, "\\r").replace(/\n/g, "\\n") + "\n");
}

start();
context.set("check", check);
context.set("stop", () => {
    stopping = true;
    if (child) child.kill();
});
