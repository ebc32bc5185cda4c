"""envctl: keep shared conda environments usable by everyone who shares them.

The package flows one way: ``config`` → ``policy`` → ``heal`` → ``watch`` → ``jobs`` → ``api`` →
``daemon`` / ``cli``. Lower layers never import higher ones.
"""

__version__ = "0.1.0"
