"""Log-linear latency histogram (HdrHistogram's bucket layout, simplified).

Values are integers (nanoseconds). Below 2**SUB_BITS every value has its own bucket; above, each
power of two is split into 2**(SUB_BITS-1) equal buckets, so the relative error of a reported
percentile is at most 2**-(SUB_BITS-1) (1.6 % with SUB_BITS = 7). Buckets live in a dict, so
histograms are sparse, JSON-friendly and merge by addition.
"""

from __future__ import annotations

SUB_BITS = 7
_HALF = 1 << (SUB_BITS - 1)


def bucket_of(value: int) -> int:
    if value < 0:
        value = 0
    e = value.bit_length() - SUB_BITS
    if e <= 0:
        return value
    return e * _HALF + (value >> e)


def bucket_range(index: int) -> tuple[int, int]:
    """[low, high) of the values that fall in bucket `index`."""
    if index < (1 << SUB_BITS):
        return index, index + 1
    e = index // _HALF - 1
    m = index - e * _HALF
    return m << e, (m + 1) << e


class Histogram:
    __slots__ = ("counts", "max_value", "min_value", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max_value = 0
        self.min_value: int | None = None

    def record(self, value: int, count: int = 1) -> None:
        b = bucket_of(value)
        self.counts[b] = self.counts.get(b, 0) + count
        self.total += count
        if value > self.max_value:
            self.max_value = value
        if self.min_value is None or value < self.min_value:
            self.min_value = value

    def merge(self, other: Histogram) -> None:
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        self.total += other.total
        self.max_value = max(self.max_value, other.max_value)
        if other.min_value is not None and (self.min_value is None
                                            or other.min_value < self.min_value):
            self.min_value = other.min_value

    def percentile(self, p: float) -> float | None:
        """Value at percentile p (0-100): midpoint of the bucket holding that rank."""
        if not self.total:
            return None
        rank = max(1, round(self.total * p / 100.0))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                lo, hi = bucket_range(b)
                return min((lo + hi - 1) / 2, self.max_value)
        return float(self.max_value)

    def to_dict(self) -> dict:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "total": self.total,
                "max": self.max_value, "min": self.min_value}

    @classmethod
    def from_dict(cls, d: dict) -> Histogram:
        h = cls()
        h.counts = {int(k): v for k, v in d["counts"].items()}
        h.total = d["total"]
        h.max_value = d["max"]
        h.min_value = d["min"]
        return h

    def summary_ms(self) -> dict:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v / 1e6, 3)
        return {"count": self.total, "p50_ms": ms(self.percentile(50)),
                "p99_ms": ms(self.percentile(99)), "p999_ms": ms(self.percentile(99.9)),
                "max_ms": ms(self.max_value if self.total else None)}
