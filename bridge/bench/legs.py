"""Where a slow stretch of the soak was spent: the bridge's own latency histograms.

The consumer measures delivery latency end to end, from the simulator's send to the
consumer's receipt; a sample over the target does not say which leg held the events.
The bridge times two legs itself (bridge/metrics.py): from a frame's receipt to the
broker's confirm, and from the publish to that confirm. Its /metrics is read once a
sample; what the histograms gained between two reads gives each leg's p99 over that
stretch (of the events confirmed in it):

- receive-to-confirm high, publish-to-confirm low: the events waited inside the bridge;
- both high: the broker was slow to confirm;
- both low while the end-to-end p99 is high: the time went before the bridge read the
  frame or after the broker confirmed it (delivery to the consumer).

The figures are estimated from the histogram's buckets as Prometheus'
`histogram_quantile` does, by linear interpolation within the bucket, so they are
only as fine as the buckets (1, 2.5, 5, 10, 25, 50, 100, 250, 500 ms, ...).
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

RECEIVE_P99, PUBLISH_P99 = "receive_to_confirm_p99_ms", "publish_to_confirm_p99_ms"
LEGS = {"tutum_bridge_receive_to_confirm_seconds": RECEIVE_P99,    # histogram: sample key
        "tutum_bridge_publish_to_confirm_seconds": PUBLISH_P99}
SCRAPE_TIMEOUT = 2.0


def buckets(text: str) -> dict[str, list[tuple[float, float]]]:
    """Each leg's (upper bound, cumulative count) pairs, from a /metrics page's text."""
    out: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in LEGS:
            out[family.name] = [(float(s.labels["le"]), s.value) for s in family.samples
                                if s.name.endswith("_bucket")]
    return out


def quantile(q: float, before: list[tuple[float, float]],
             after: list[tuple[float, float]]) -> float | None:
    """The q-quantile, in seconds, of what was observed between two reads of one
    histogram; None when nothing was. An estimate past the last finite bound is that
    bound, as in Prometheus."""
    counts = [(bound, now - then) for (bound, now), (_, then) in zip(after, before)]
    total = counts[-1][1] if counts else 0      # the +Inf bucket counts everything
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in counts[:-1]:       # the finite buckets
        if cumulative >= rank:      # in this bucket, so it holds more than `below`
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return lower                    # in the +Inf bucket


class Legs:
    """Call once a sample: the p99 of each leg, in ms, since the previous call."""

    def __init__(self, metrics_url: str) -> None:
        self.url = metrics_url
        self._last: dict[str, list[tuple[float, float]]] | None = None

    def sample(self) -> dict[str, float | None]:
        try:
            with urllib.request.urlopen(self.url, timeout=SCRAPE_TIMEOUT) as response:
                now = buckets(response.read().decode())
        except (OSError, ValueError):
            now = None      # a missed read: this stretch and the next have no legs
        last, self._last = self._last, now
        out = {}
        for name, key in LEGS.items():
            value = None
            if last and now and name in last and name in now:
                value = quantile(0.99, last[name], now[name])
            out[key] = None if value is None else value * 1000
        return out
