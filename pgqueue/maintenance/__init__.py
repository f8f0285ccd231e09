"""Maintenance: the duties that run once per database, by whichever worker leads.

Every worker runs a `Maintenance` loop; the one that holds the leader lease row
(`pgqueue.leaders`) does the duties, the others only keep asking. A duty is one
file here: rescue, presence, pruning; cron schedules join the same list.
"""

from __future__ import annotations

from .runner import Maintenance

__all__ = ["Maintenance"]
