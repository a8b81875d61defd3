"""Host circuit breaker: a host that keeps failing is paused, so its queue no longer sets the pace.

After ``failures`` consecutive timeouts, slow transfers or connection failures from one host, the
host is paused for ``cooldown`` seconds: its queued URLs end at once as ``host_unresponsive``
(retryable by ``--retry-failed``). The first URL after the cool-down is a probe, alone in flight to
the host: an answer closes the breaker and lets the waiting URLs go, a failure pauses the host
again. A worker keeps one breaker for all its batches, so a host paused in one shard stays paused
in the next until its cool-down ends. Any answer (an image, a 404, a 429...) resets the count; politeness (per-host limits,
Retry-After, backoff) is the fetcher's and stays as it is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import Enum

FAILURES = frozenset({"timeout", "too_slow", "connection_error"})
REFUSED = "host_unresponsive"


class Admission(Enum):
    GO = "go"
    PROBE = "probe"
    REFUSE = "refuse"


@dataclass
class _Host:
    failures: int = 0
    paused_until: float | None = None  # time.monotonic(); None: closed
    probe: asyncio.Future | None = None  # set while a probe is in flight


class HostBreaker:
    """One worker's breaker; ``failures=0`` turns it off. Used by one event loop at a time."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.hosts: dict[str, _Host] = {}

    async def admit(self, host: str) -> Admission:
        """Whether a URL of ``host`` may be fetched now; waits while a probe of the host is in flight."""
        state = self.hosts.get(host)
        while state is not None and state.paused_until is not None:
            if state.probe is not None:
                await asyncio.shield(state.probe)
                continue
            if time.monotonic() < state.paused_until:
                return Admission.REFUSE
            state.probe = asyncio.get_running_loop().create_future()
            return Admission.PROBE
        return Admission.GO

    def report(self, host: str, status: str, admission: Admission) -> None:
        """Count the outcome ``status`` of a fetch that :meth:`admit` let through as ``admission``."""
        if not self.failures:
            return
        state = self.hosts.setdefault(host, _Host())
        now = time.monotonic()
        if status not in FAILURES:
            state.failures, state.paused_until = 0, None
        else:
            state.failures += 1
            paused = state.paused_until is not None and now < state.paused_until
            if admission is Admission.PROBE or (not paused and state.failures >= self.failures):
                state.paused_until = now + self.cooldown
        if admission is Admission.PROBE and state.probe is not None:
            state.probe.set_result(None)
            state.probe = None
