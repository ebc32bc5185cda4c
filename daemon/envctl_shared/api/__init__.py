"""The daemon's Unix-socket API: JSON lines, kernel-verified identity, and nothing else.

Why a package of its own: the socket is the only way an unprivileged user reaches a process that
runs builds with more privilege, so everything that touches untrusted bytes lives here and stays
small enough to audit. ``protocol`` is the op table (which doubles as help text), the framing and
the envelopes; ``peercred`` asks the kernel who is on the other end; ``auth`` turns that identity
into a :class:`~envctl_shared.jobs.model.Requester` and decides what it may do; ``listener``
creates the socket file safely; ``server`` is the threaded accept/connection loop with its limits;
``handlers`` is what each op does; ``client`` is what the CLI uses. The layers below (jobs,
heal) know nothing about sockets. The wire format is documented in ``docs/protocol.md``.
"""
