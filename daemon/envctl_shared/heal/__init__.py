"""Healing: make entries under a root match the policy, safely, through file descriptors.

``walker`` is the one walker every pass uses; ``fsops`` holds the fd-level primitives Python
lacks; ``stats`` the counters and findings a pass returns.
"""

from .stats import Finding, HealStats
from .walker import Healer

__all__ = ["Finding", "HealStats", "Healer"]
