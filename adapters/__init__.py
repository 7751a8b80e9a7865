"""Source adapters: pure translation between a platform's messages and the energy bus.

Each adapter lives in a module of the same name as its mapping file in
``energybus.mappings`` and its golden-test folder.
"""
