"""The web dashboard (``fillgate serve``), an optional extra: ``pip install 'fillgate[web]'``.

Nothing here is imported by ``import fillgate`` or the CLI until ``fillgate serve`` runs.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from fillgate.errors import ConfigError, MissingExtraError

WEB_PACKAGES = ("starlette", "jinja2", "uvicorn", "prometheus_client", "multipart")
DEFAULT_PORT = 8642


def require_extra() -> None:
    """Fail clearly when the ``web`` extra is not installed."""
    import importlib.util

    missing = [name for name in WEB_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"fillgate serve needs the web extra ({', '.join(missing)} not installed); "
            "install it with: pip install 'fillgate[web]'"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: Path | None) -> str | None:
    """The token from ``--token-file`` or ``FILLGATE_WEB_TOKEN`` (None: no token)."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror or exc}.") from None
        if not token:
            raise ConfigError(f"token file {token_file} is empty; put the dashboard's token in it.")
        return token
    token = os.environ.get("FILLGATE_WEB_TOKEN", "").strip()
    return token or None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fillgate" / "plan-index"


def serve(
    config_path: str | Path | None, targets: list[str] | None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
    read_only: bool = False, token_file: Path | None = None, cache_dir: Path | None = None,
) -> None:
    """Run the dashboard with uvicorn until Ctrl-C."""
    require_extra()
    token = read_token(token_file)
    loopback = is_loopback(host)
    if not loopback and token is None:
        raise ConfigError(
            f"binding the dashboard to {host} (not 127.0.0.1) needs a token: set FILLGATE_WEB_TOKEN or pass "
            "--token-file FILE; requests without it then get 401."
        )
    import uvicorn

    from fillgate.web.app import Settings, create_app
    from fillgate.web.data import Dashboard

    settings = Settings(config_path, targets, cache_dir or default_cache_dir(), read_only, token, loopback)
    board = Dashboard(config_path, targets, settings.cache_dir)
    app = create_app(settings, board)
    shown = f"[{host}]" if ":" in host else host
    mode = " (read-only)" if read_only else ""
    print(f"fillgate dashboard{mode} on http://{shown}:{port}/ serving {', '.join(board.names)}"
          + ("; it asks for its token" if token else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
