// The processes end with the flow (a deploy starts them again).
context.get("stop")();
