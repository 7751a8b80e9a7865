"""Simulators play source platforms for demos, tests and benchmarks.

Each module here speaks one platform's wire format from the platform's side, so that
energybus can be run and measured against something that behaves like the real thing
without access to it: ``voke`` plays the Voke ESM platform over RabbitMQ (the VCP
format, docs/adapters.md), ``ven`` a demand-response node and ``cpi`` a signed CPI plant
over MQTT (run by ``mqtt``'s player over a connection the caller makes), ``modbus`` a
Modbus device; ``plant`` is the physics the plants share. A simulator may use the
contract and the adapters' helpers (signing), never the worker or the CLI.
"""
