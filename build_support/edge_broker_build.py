"""Build backend of edge-broker: setuptools, plus an optional mypyc-compiled build.

`pip install .` builds a wheel. By default (mode "auto") that wheel has the modules of
`edge_broker/mqtt/` and `edge_broker/core/` compiled to C extension modules with mypyc when
this machine can compile them (a C compiler and the Python headers: on Debian/Raspberry Pi OS
`sudo apt-get install build-essential python3-dev`); otherwise it is the pure-Python package,
and the build says why. The compiled modules sit next to their `.py` sources in the wheel;
Python imports the extension module first.

`pip install -e .` (an editable install, for development) is always pure Python, so an edit
to a `.py` file is never shadowed by a stale compiled module.

The mode comes from the environment variable EDGE_BROKER_COMPILE or the PEP 517 config setting
`compile` (`pip install . --config-settings compile=1`); the config setting wins:

- `auto` (default, also when unset or empty): compile when possible, else pure Python;
- `1` (also `yes`, `true`, `on`): compile, and fail the build if that is not possible;
- `0` (also `no`, `false`, `off`): pure Python.

mypy (which contains mypyc) is a build requirement only when a wheel is compiled. setup.py
imports this module for the decision and the build steps; see docs/compiled.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools

ENV = "EDGE_BROKER_COMPILE"
SETTING = "compile"
# The version of mypy (mypyc) used to compile; any release that supports Python 3.11 and
# compiles the strict packages works, the floor is the one the project's mypy check uses.
MYPY_REQUIREMENT = "mypy>=1.8"
APT_HINT = "sudo apt-get install -y build-essential python3-dev"
# Set by the backend while it builds an editable wheel: setup.py then never compiles.
_EDITABLE_ENV = "_EDGE_BROKER_EDITABLE_BUILD"

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


class CompileModeError(ValueError):
    pass


def mode(config_settings: dict[str, Any] | None = None) -> str:
    """'auto', 'on' or 'off', from the config setting, else the environment."""
    raw = None
    if config_settings and SETTING in config_settings:
        raw = config_settings[SETTING]
        if isinstance(raw, list):  # given more than once: the last one
            raw = raw[-1]
    if raw is None:
        raw = os.environ.get(ENV, "")
    text = str(raw).strip().lower()
    if text in ("", "auto"):
        return "auto"
    if text in _TRUE:
        return "on"
    if text in _FALSE:
        return "off"
    raise CompileModeError(f"{ENV}/--config-settings {SETTING}={raw!r}: use auto, 1 or 0")


def toolchain_problem() -> str | None:
    """Why this machine cannot compile C extension modules for this Python, or None."""
    # setuptools compiles with $CC when set, else the compiler Python was built with.
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not cc or shutil.which(cc[0]) is None:
        return f"no C compiler ({cc[0] if cc else 'cc'!r} not found); install: {APT_HINT}"
    include = sysconfig.get_paths().get("include") or ""
    if not Path(include, "Python.h").is_file():
        return (f"no Python headers ({include}/Python.h missing); install: {APT_HINT} "
                f"(python3.{sys.version_info[1]}-dev for a non-default Python)")
    return None


def say(message: str) -> None:
    """A build message; pip shows it with `pip install -v`, and always when the build fails."""
    print(f"edge-broker build: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- PEP 517 hooks

def _strip(config_settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """The settings for setuptools: without ours (setuptools would pass it on to setup.py)."""
    if not config_settings:
        return config_settings
    return {k: v for k, v in config_settings.items() if k != SETTING} or None


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    requires = list(_setuptools.get_requires_for_build_wheel(_strip(config_settings)))
    wanted = mode(config_settings)
    if wanted == "on" or (wanted == "auto" and toolchain_problem() is None):
        requires.append(MYPY_REQUIREMENT)
    return requires


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    os.environ[ENV] = {"auto": "auto", "on": "1", "off": "0"}[mode(config_settings)]
    return str(_setuptools.build_wheel(wheel_directory, _strip(config_settings),
                                       metadata_directory))


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    if mode(config_settings) == "on":
        say(f"{ENV}=1 is ignored for an editable install (pip install -e): it is always pure "
            "Python, so that edits are never shadowed by compiled modules. Build a wheel "
            "(pip install .) to compile.")
    os.environ[_EDITABLE_ENV] = "1"
    try:
        return str(_setuptools.build_editable(wheel_directory, _strip(config_settings),
                                              metadata_directory))
    finally:
        os.environ.pop(_EDITABLE_ENV, None)


def get_requires_for_build_editable(
        config_settings: dict[str, Any] | None = None) -> list[str]:
    return list(_setuptools.get_requires_for_build_editable(_strip(config_settings)))


def prepare_metadata_for_build_wheel(metadata_directory: str,
                                     config_settings: dict[str, Any] | None = None) -> str:
    return str(_setuptools.prepare_metadata_for_build_wheel(metadata_directory,
                                                            _strip(config_settings)))


def prepare_metadata_for_build_editable(metadata_directory: str,
                                        config_settings: dict[str, Any] | None = None) -> str:
    return str(_setuptools.prepare_metadata_for_build_editable(metadata_directory,
                                                               _strip(config_settings)))


def get_requires_for_build_sdist(config_settings: dict[str, Any] | None = None) -> list[str]:
    return list(_setuptools.get_requires_for_build_sdist(_strip(config_settings)))


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    return str(_setuptools.build_sdist(sdist_directory, _strip(config_settings)))
