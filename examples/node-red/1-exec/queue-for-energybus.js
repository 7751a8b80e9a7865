// New messages, and the exec node's exit codes; the queue is set up in On Start.
return [context.get("queue")(msg)];
