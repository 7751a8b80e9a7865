"""PostgreSQL sinks: the measurement and counter historians and command records."""
