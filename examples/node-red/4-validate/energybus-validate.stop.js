// The process ends with the flow (a deploy starts it again).
context.get("stop")();
