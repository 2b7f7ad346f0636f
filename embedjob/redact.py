"""Secrets out of everything embedjob prints, logs or writes beside its outputs.

Configs carry credentials (``input.storage_options.key``/``secret``, ``aws_*`` keys under
``client_kwargs``, tokens, passwords in URLs). :func:`redact` is the one masking applied wherever a
config is shown: ``--dry-run``, logs, ``config.json``, ``manifest.json`` and stage reports. It
imports nothing of embedjob, so every module may use it.

Example::

    redact({"storage_options": {"key": "AKIA...", "client_kwargs": {"endpoint_url": "http://x"}}})
    # {'storage_options': {'key': '***', 'client_kwargs': {'endpoint_url': 'http://x'}}}
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# key, secret, token, password, credentials, aws_access_key_id, aws_secret_access_key, session_token, ...
_SECRET_KEY = re.compile(r"(^|_)(key|key_id|secret|token|password|passwd|credentials?)$", re.IGNORECASE)
# user:password@ inside a URL (s3://AKIA:SECRET@bucket/..., https://user:pw@host/...)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def is_secret_key(name: Any) -> bool:
    """True for a mapping key whose value is a credential (``key``, ``aws_secret_access_key``...)."""
    return isinstance(name, str) and bool(_SECRET_KEY.search(name))


def redact_url(text: str) -> str:
    """``s3://AKIA:SECRET@bucket/x`` -> ``s3://***@bucket/x``; other strings unchanged."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with the values of secret-looking keys masked (nested dicts and lists
    are walked) and credentials inside URLs masked."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) and v is not None and not isinstance(v, (dict, list))
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and "@" in obj:
        return redact_url(obj)
    return obj
