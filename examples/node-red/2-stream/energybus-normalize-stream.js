// Each message to its adapter's process, set up in On Start; what comes back is sent
// from there.
context.get("feed")(msg);
return null;
