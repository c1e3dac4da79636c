"""Named streams: the `[[streams]]` tables of the configuration.

A stream is a filter over the one log (see the package docstring): it owns no rows, it only
holds the rows of its topics at or above its floor. The tables are parsed by
`edge_broker.config.parse_streams` into frozen `StreamConfig` values (`Config.streams`), every
error a `ConfigError` naming the file, `[[streams]] #N` and the key; this module re-exports
them for the log's users.

Without `max_age` and `max_bytes` a stream keeps `DEFAULT_MAX_AGE_S` (7 days) and at most
`DEFAULT_MAX_BYTES` (256 MiB); with only one of them given, only that one bounds it.
"""

from __future__ import annotations

from ...config import STREAM_DEFAULT_MAX_AGE_S as DEFAULT_MAX_AGE_S
from ...config import STREAM_DEFAULT_MAX_BYTES as DEFAULT_MAX_BYTES
from ...config import StreamConfig, parse_streams

__all__ = ["DEFAULT_MAX_AGE_S", "DEFAULT_MAX_BYTES", "StreamConfig", "parse_streams"]
