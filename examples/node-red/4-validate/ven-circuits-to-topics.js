// One VEN metering message in, a message per topic out; set up in On Start.
return [context.get("translate")(msg)];
