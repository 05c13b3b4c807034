"""The ``edge-agent`` command line: ``cli.py`` (the app, run, dev box, fleet),
``options.py`` (what every command shares) and one ``*_cmd.py`` per command group.

Thin: parse, check the caller's role, call agent/ or fleet/, print.  May import
everything under agent/ and fleet/; nothing imports it but the entry point and tests.
"""
