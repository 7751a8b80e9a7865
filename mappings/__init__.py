"""Mapping files (TOML) that describe each source platform's fields as data."""
