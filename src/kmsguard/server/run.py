"""Running the service under uvicorn: ``kmsguard serve``.

uvicorn does the graceful part: on SIGTERM (or SIGINT) it stops accepting, lets
in-flight requests finish for up to ``shutdown_timeout`` seconds, then runs each
worker's lifespan shutdown, which closes the Guard and so flushes the audit trail.
With ``workers > 1`` the supervisor process passes the signal to every worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kmsguard.config import load_settings
from kmsguard.errors import ConfigurationError
from kmsguard.server.apikeys import open_store
from kmsguard.server.settings import ServerSettings
from kmsguard.stack import build_keyring


def serve(overrides: Mapping[str, Any], uvicorn_options: Mapping[str, Any] | None = None) -> None:
    """Validate the settings (so a bad one fails here, in one line), then run uvicorn until stopped."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError("kmsguard serve needs the server extra: pip install 'kmsguard[server]'") from None
    settings = load_settings()
    server = ServerSettings.of(settings, **overrides)
    # Workers are fresh processes that read the settings again: hand them the command
    # line's choices through the environment they inherit.
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"KMSGUARD_SERVER_{name.upper()}"] = str(value)
    # Fail before listening, in one line: a key file that cannot be opened, an API key
    # store that cannot be read (workers would each fail with a traceback).
    close = getattr(build_keyring(settings), "close", None)
    if callable(close):
        close()
    if server.auth == "api_keys":
        open_store(server.api_keys, settings.home, server.api_keys_dsn, server.api_keys_schema).load()
    uvicorn.run(
        "kmsguard.server.app:app_from_env",
        factory=True,
        host=server.host,
        port=server.port,
        workers=server.workers,
        timeout_graceful_shutdown=max(1, round(server.shutdown_timeout)),
        log_level="info",
        access_log=False,
        server_header=False,
        **(uvicorn_options or {}),
    )
