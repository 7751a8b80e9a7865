// Standard error and exit codes of the exec node; set up in On Start.
return [context.get("letters")(msg)];
