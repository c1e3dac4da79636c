"""The installed distribution's version, found without importing `importlib.metadata`.

`importlib.metadata` (with the `email`, `zipfile`, `csv` and `shutil` modules it pulls in)
costs about 45 ms of CPU to import, a tenth of the broker's whole start-up (S8, issue 8), to
read one string. An installed wheel, and an editable install, leave a directory named
`edge_broker-<version>.dist-info` on `sys.path` (the wheel format escapes `-` in both parts as
`_`), so the version is in a directory listing. When no such directory is found (an egg, an
unusual installer), `importlib.metadata` answers after all.
"""

from __future__ import annotations

import os
import sys

DISTRIBUTION = "edge-broker"
_PREFIX = "edge_broker-"
_SUFFIX = ".dist-info"


def installed_version() -> str | None:
    """The version of the first `edge-broker` distribution on `sys.path` (the one
    `importlib.metadata.version` reports), or None when none is installed."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:  # a zip file, a missing directory
            continue
        found = sorted(n for n in names
                       if n.lower().startswith(_PREFIX) and n.endswith(_SUFFIX)
                       and os.path.isfile(os.path.join(entry or ".", n, "METADATA")))
        if len(found) == 1:
            return found[0][len(_PREFIX):-len(_SUFFIX)]
        if found:  # several: let importlib.metadata pick, as it would have
            break
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
