"""``envctl web``: envctl as a JupyterHub service — pages for people, an HTTP API for scripts.

Why a service and not part of the daemon: the daemon is root and speaks only a Unix socket on
its node; the web service runs unprivileged (as the uid the hub's users share,
``jupyterhub.shared_uids``), signs people in with the hub's own OAuth, and forwards each
user's hub token with every request, so the daemon verifies the user exactly as for the CLI and
the service holds no power of its own. ``routes`` is the HTTP API's table (from the protocol's
op table), ``link`` the calls to the daemon, ``app`` the tornado application.
"""
