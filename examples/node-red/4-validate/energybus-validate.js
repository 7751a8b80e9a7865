// Each message to the validating process, set up in On Start; valid ones go on from there.
context.get("check")(msg);
return null;
