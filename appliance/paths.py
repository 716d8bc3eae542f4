"""Where things live on a host: the store directory and its well-known sub-paths."""

from __future__ import annotations

import os
from pathlib import Path

STORE_ENV = "APPLIANCE_HOME"
# The passphrase of encrypted private keys (appliance.keyfiles); named here with the other
# environment variables so that the CLI can mention it without loading cryptography.
PASSPHRASE_ENV = "APPLIANCE_PASSPHRASE"


def default_store() -> Path:
    """``$APPLIANCE_HOME`` if set, else the platform's user data dir.

    On Linux that is ``~/.local/share/appliance``.
    """
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs  # only here: most commands name their store, and it costs 10 ms

    return Path(platformdirs.user_data_dir("appliance", appauthor=False))
