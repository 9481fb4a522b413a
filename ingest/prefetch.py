"""How many unacked AMQP messages a pool asks for, when ``queues.amqp.prefetch`` is not set.

A message stays unacked from its delivery until its result is published, confirmed by the
broker and acked; only then does the broker send the next one. So the prefetch window holds
three kinds of message: those running (one per slot), those waiting here for a slot, and
those *settling* (finished, result on its way). The rule we keep is "at most one message
waits per slot" (the others stay in the queue, free for another pool). The base window is
therefore two per slot, and the tuner adds room for the settling ones only when they would
otherwise starve the slots:

A slot that finishes starts its waiting message at once; its own message then settles
(``settle_s``: publish, confirm, ack) and the broker needs about as long again to send the
replacement. While that round takes less than one prediction (``run_s``), the replacement
arrives before it is needed and two per slot suffice: every prediction of more than a few
milliseconds. Below that, about ``2 * settle_s / run_s`` messages per slot are on their way at
any time and each needs a credit of its own, else the slot idles. The tuner measures both
(moving averages), and sizes the window ``slots * (2 + extra)`` with
``extra = ceil(2 * settle_s / run_s) - 1``, bounded by ``max_per_slot``.

A change needs a few dozen samples and a few seconds since the last one (no flapping); the
driver applies it by consuming anew with the new prefetch (RabbitMQ applies ``basic.qos``
only to consumers started after it).
"""

from __future__ import annotations

import math

__all__ = ["PrefetchTuner"]

BASE_PER_SLOT = 2  # one running, one waiting


class PrefetchTuner:
    """Picks the prefetch of one consumer from its own run and settle times."""

    def __init__(
        self,
        slots: int,
        *,
        max_per_slot: int = 4,
        min_samples: int = 50,
        interval_s: float = 5.0,
        alpha: float = 0.1,
    ) -> None:
        self.slots = max(1, slots)
        self.max_per_slot = max(BASE_PER_SLOT, max_per_slot)
        self.min_samples = min_samples
        self.interval_s = interval_s
        self.alpha = alpha
        self.current = self.slots * BASE_PER_SLOT
        self.run_s: float | None = None
        self.settle_s: float | None = None
        self._samples = 0
        self._changed_at: float | None = None

    def observe(self, run_s: float, settle_s: float) -> None:
        """One settled message: how long it ran here, how long its result took to settle."""
        if run_s < 0 or settle_s < 0 or not math.isfinite(run_s + settle_s):
            return
        a = self.alpha
        self.run_s = run_s if self.run_s is None else (1 - a) * self.run_s + a * run_s
        self.settle_s = (
            settle_s if self.settle_s is None else (1 - a) * self.settle_s + a * settle_s
        )
        self._samples += 1

    def wanted(self) -> int:
        """The prefetch the measurements ask for (the base window before any)."""
        if self.run_s is None or self.settle_s is None:
            return self.slots * BASE_PER_SLOT
        ratio = 2 * self.settle_s / max(self.run_s, 1e-6)
        extra = max(0, math.ceil(ratio) - 1)
        per_slot = min(self.max_per_slot, BASE_PER_SLOT + extra)
        return self.slots * per_slot

    def due(self, now: float) -> int | None:
        """A new prefetch to apply now, or None (too few samples, too soon, no change)."""
        if self._samples < self.min_samples:
            return None
        if self._changed_at is not None and now - self._changed_at < self.interval_s:
            return None
        wanted = self.wanted()
        return wanted if wanted != self.current else None

    def applied(self, prefetch: int, now: float) -> None:
        """The driver set ``prefetch``: measure afresh from here."""
        self.current = prefetch
        self._changed_at = now
        self._samples = 0
