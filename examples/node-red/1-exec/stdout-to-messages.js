// Standard output and exit codes of the exec node; set up in On Start.
return [context.get("messages")(msg)];
