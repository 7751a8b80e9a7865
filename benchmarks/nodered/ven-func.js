// The translation is set up in On Start (context "ven"); see there.
return [context.get("ven")(msg.topic, msg.payload)];
