// The exec node sends energybus's standard output as it comes, in pieces that need not
// end at a line (nor at a UTF-8 character), each piece a copy of the input message; the
// pieces of one input (its _msgid) are put together, and each whole line, one canonical
// message as JSON, goes to mqtt out as it is. The exit code ({code}) ends an input.
const pieces = new Map();

function messages(msg) {
    const id = msg._msgid;
    let rest = pieces.get(id) || Buffer.alloc(0);
    pieces.delete(id);
    if (!(typeof msg.payload === "string" || Buffer.isBuffer(msg.payload))) {
        if (rest.length) node.warn(`energybus output ended inside a line: ${rest}`);
        return [];
    }
    rest = Buffer.concat([rest, Buffer.from(msg.payload)]);
    const out = [];
    for (let end = rest.indexOf(10); end >= 0; end = rest.indexOf(10)) {
        const line = rest.subarray(0, end).toString("utf8");
        rest = rest.subarray(end + 1);
        if (line) {
            const { topic, payload, qos, retain } = JSON.parse(line);
            out.push({ topic, payload, qos, retain });
        }
    }
    if (rest.length) pieces.set(id, rest);
    return out;
}

context.set("messages", messages);
