// One VEN metering message in, its canonical messages out; set up in On Start.
return [context.get("translate")(msg)];
