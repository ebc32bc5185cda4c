"""envctld: the daemon process (composition root, signals, systemd glue, logging).

``main`` is the entry point; ``service.Daemon`` wires the roots' watchers and the request side
together; ``systemd`` speaks sd_notify and socket activation with or without libsystemd;
``logsetup`` sends logs to stderr as key=value or to the journal with structured fields.
"""
