"""Passwords out of everything fillgate prints: one masking function for URLs, DSNs and the
messages drivers write (which may echo the connection string they were given).

``mask_secrets`` is the only masking function; ``redact_url`` renders a URL through it.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

MASK = "***"

# scheme://user:PASSWORD@host: the password runs to the last "@" before the query string, so
# a password with a raw "@", ":" or "/" in it is masked whole (at worst, with the host).
# A password may hold spaces and quotes too (a URL that does not parse is shown as written), so
# it runs to the first "@" on the line that is followed by a host.
_USERINFO = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/@\s'\"]*:)[^\r\n]*?@(?=[^@\s'\"?#]+(?:[?#\s'\"]|$))")
# password=..., pass=..., pwd=..., sslpassword=... in a query string or a key=value DSN
_PARAM = re.compile(
    r"(?i)((?:^|(?<=[?&;\s,(]))(?:ssl)?(?:password|passwd|pass|pwd)\s*=\s*)"
    r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^&\s;,)'\"]*)"
)
# 'password': '...' in a dict or JSON rendering of connection arguments
_MAPPING = re.compile(
    r"(?i)(['\"](?:ssl)?(?:password|passwd|pass|pwd)['\"]\s*:\s*)('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"
)


def mask_secrets(text: str) -> str:
    """``text`` with every password it may hold replaced by ``***``: the password of a URL's
    userinfo (``postgresql://app:***@db/app``), ``password=``/``pass=``/``pwd=``/
    ``sslpassword=`` parameters of a query string or DSN, and ``'password': '...'`` pairs."""
    if not text:
        return text
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _PARAM.sub(rf"\1{MASK}", text)
    return _MAPPING.sub(rf"\1'{MASK}'", text)


def redact_url(url: URL | str, *, hide_path: bool = False) -> str:
    """Render a URL with its passwords masked. ``hide_path`` keeps only scheme, host and port
    (for webhooks, whose path and query are often the secret)."""
    text = url if isinstance(url, str) else url.render_as_string(hide_password=True)
    if hide_path:
        parts = urllib.parse.urlsplit(text)
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            port = ""
        return f"{parts.scheme}://{parts.hostname or ''}{port}/…"
    return mask_secrets(text)


def mask_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Job parameters as fillgate records them (plan header, the run's arguments): every text
    value through :func:`mask_secrets` (a ``--param url=postgresql://app:pw@db/x`` is kept as
    ``postgresql://app:***@db/x``). The job itself gets the values as given."""
    return {name: mask_secrets(value) if isinstance(value, str) else value for name, value in params.items()}
