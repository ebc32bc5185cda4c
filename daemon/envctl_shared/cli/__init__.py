"""The ``envctl`` command line: one module per command group, one place that maps errors to exits.

``main`` builds the parser from each command module's ``add_parser``; ``output`` holds the
formatting shared by all commands (the daemon returns data; the CLI formats it, and ``--json``
prints the data as it is).
"""
