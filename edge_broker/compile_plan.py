"""Which modules the compiled build (mypyc) compiles, and which it leaves Python, and why.

Read by setup.py (which loads this file on its own, so it imports nothing) and by
`edge_broker.buildinfo`. Every module of the packages below is compiled except the package
`__init__`s and the modules of NOT_COMPILED. See docs/compiled.md.
"""

from __future__ import annotations

from typing import Final

# Source directories (relative to the project root), searched recursively.
COMPILED_PACKAGES: Final = (
    "edge_broker/mqtt",
    "edge_broker/core",
    "edge_broker/server",
    "edge_broker/store",
    "edge_broker/bridge",
)

_MIXIN = ("a part of SqliteStore, which inherits from four such mixins: mypyc compiles "
          "multiple inheritance only from traits, and a compiled base cannot be combined "
          "with others in a Python class")
_ASYNC_GENERATOR = ("a bridge client of an external system (I/O bound, imported only for "
                    "that bridge kind) with an async generator, which mypyc does not compile")

_BRIDGES = ("starting, stopping and reporting bridges (bridges.py, bridge_status.py), and the "
            "downlink (bridge_downlink.py): not the uplink forwarding of issue 9, which is "
            "bridge/forward.py and server/bridge_log.py")
_PERIODIC = ("bounded maintenance steps between group commits or once per subscription, not "
             "per message: left out to keep the build short")
_COLD = ("not on the per-message path (start-up, configuration, admin, TLS handshakes, "
         "operator views): compiling it would only lengthen the build (the C that mypyc "
         "generates for async functions is large)")

# Module path -> why it stays Python.
NOT_COMPILED: Final[dict[str, str]] = {
    "edge_broker/store/memory.py": (
        "the in-memory store of tests and benchmarks; tests subclass MemoryStore, which a "
        "compiled class does not allow"),
    "edge_broker/store/sqlite/state.py": _MIXIN,
    "edge_broker/store/sqlite/store.py": _MIXIN,
    "edge_broker/store/sqlite/writer.py": _MIXIN,
    "edge_broker/store/sqlite/opening.py": _MIXIN,
    "edge_broker/store/sqlite/maintenance.py": _MIXIN,
    "edge_broker/store/sqlite/space.py": _MIXIN,
    "edge_broker/store/sqlite/validate.py": (
        "subclasses bytes (Undecodable), which a compiled class cannot; runs only at open"),
    "edge_broker/bridge/jetstream.py": (
        "imports nats-py (an extra) when imported, and is imported only for a jetstream "
        "bridge; its per-message work is jetstream_frames.py and jetstream_batch.py, "
        "which are compiled"),
    "edge_broker/bridge/jetstream_downlink.py": _ASYNC_GENERATOR,
    "edge_broker/bridge/kafka.py": _ASYNC_GENERATOR,
    "edge_broker/bridge/mqtt_upstream.py": _ASYNC_GENERATOR,
    "edge_broker/bridge/mqtt_upstream_wire.py": (
        "pieces of mqtt_upstream.py (Python, above): its connection set-up, and what it "
        "calls per message, which gains nothing compiled when its caller is not"),
    "edge_broker/bridge/mqtt_servers.py": _COLD,
    "edge_broker/bridge/base.py": (
        "its frozen slots dataclass DownlinkMessage with a field typed `object` compiles, but "
        "the compiled module fails at import (KeyError: 'object', mypyc's dataclass set-up); "
        "BridgeMessage, made per forwarded message, is in bridge/message.py, compiled"),
    "edge_broker/server/bridges.py": _BRIDGES,
    # Split off server/bridges.py; DownlinkSide is the base of its Python class Bridge, which
    # a compiled class cannot be (without allow_interpreted_subclasses).
    "edge_broker/server/bridge_downlink.py": _BRIDGES,
    "edge_broker/server/bridge_status.py": _BRIDGES,
    "edge_broker/store/log/retention.py": _PERIODIC,
    "edge_broker/store/log/budget.py": _PERIODIC,
    "edge_broker/store/log/replay.py": _PERIODIC,
    "edge_broker/store/sqlite/guard.py": _PERIODIC,
    "edge_broker/bridge/config.py": _COLD,
    "edge_broker/bridge/config_values.py": _COLD,
    "edge_broker/server/admin.py": _COLD,
    "edge_broker/server/http.py": _COLD,
    "edge_broker/server/interface.py": _COLD,
    "edge_broker/server/listeners.py": _COLD,
    "edge_broker/server/observe.py": _COLD,
    "edge_broker/server/prometheus.py": _COLD,
    "edge_broker/server/reload.py": _COLD,
    "edge_broker/server/systemd.py": _COLD,
    "edge_broker/server/tls.py": _COLD,
    "edge_broker/server/websocket.py": _COLD,
    "edge_broker/store/log/schema.py": _COLD,
    "edge_broker/store/sqlite/readonly.py": _COLD,
    "edge_broker/store/sqlite/schema.py": _COLD,
}


def module_name(path: str) -> str:
    """'edge_broker/store/log/log.py' -> 'edge_broker.store.log.log'."""
    return path.removesuffix(".py").replace("/", ".")
