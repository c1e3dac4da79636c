"""Running the broker as a process: what `edge-broker run` calls (cli.py).

`main(config)` picks the event loop (uvloop when installed) and runs `serve`, which owns the
process's life around the `BrokerApp` (server/app.py): the signal handlers, systemd's
READY/STOPPING notifications and watchdog, and the order of start and stop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable

from ..config import Config
from ..errors import ConfigError, EdgeBrokerError, StoreDamagedError, StoreInUseError
from . import evloop, systemd
from .app import BrokerApp
from .observe import watchdog
from .reload import reload

log = logging.getLogger("edge_broker")


async def serve(config: Config, *, recover: bool = False,
                ready: Callable[[BrokerApp], Awaitable[None] | None] | None = None,
                reload_config: Callable[[], Config] | None = None,
                stop_requested: Callable[[], bool] | None = None) -> int:
    """Run until SIGTERM or SIGINT. Returns the process exit code.

    Signals (docs/configuration.md, "Signals"): SIGTERM and SIGINT stop the broker in order;
    SIGHUP reads the configuration again through `reload_config` (server/reload.py);
    SIGUSR1 logs one status line; SIGUSR2 is ignored. The handlers are installed before the
    listeners open, so a signal that arrives during start-up is never fatal: a stop request
    then stops the broker as soon as it has started.
    """
    app = BrokerApp(config, recover=recover)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, app, reload_config)
    loop.add_signal_handler(signal.SIGUSR1, app.log_status)
    loop.add_signal_handler(signal.SIGUSR2, _ignore_signal)
    if stop_requested is not None and stop_requested():
        stop.set()  # asked to stop before these handlers existed (cli's _EarlyStop)
    try:
        await app.start()
    except EdgeBrokerError as error:
        log.error("%s", error)
        # 2: retrying cannot help (the unit's RestartPreventExitStatus): a bad configuration,
        # a damaged store that needs --recover, or a store file another broker holds.
        return 2 if isinstance(error, ConfigError | StoreDamagedError | StoreInUseError) else 1
    gc.enable()  # started: the cyclic GC runs again (cli._run pauses it for the start-up)
    systemd.ready()
    pinger = asyncio.ensure_future(watchdog(app.observer))
    if ready is not None and not stop.is_set():
        result = ready(app)
        if result is not None:
            await result
    await stop.wait()
    pinger.cancel()
    log.info("shutting down")
    systemd.stopping()
    await app.stop()
    return 0


def _on_sighup(app: BrokerApp, reload_config: Callable[[], Config] | None) -> None:
    if reload_config is None:
        log.info("SIGHUP: no configuration file to read again (built-in defaults)")
        return
    reload(app, reload_config)


def _ignore_signal() -> None:
    return None


def main(config: Config, *, recover: bool = False,
         reload_config: Callable[[], Config] | None = None,
         stop_requested: Callable[[], bool] | None = None) -> int:
    """Run the broker with uvloop when it is installed, else the standard event loop."""
    return evloop.run(serve(config, recover=recover, reload_config=reload_config,
                            stop_requested=stop_requested))

