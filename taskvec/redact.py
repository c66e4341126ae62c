"""Keep credentials out of logs, tags, params and model cards.

Tracking and database URIs often carry secrets (``postgresql://user:pw@host/db``,
``https://user:token@host``, ``https://host/?token=...``), and the environment
holds tokens (``MLFLOW_TRACKING_TOKEN``, ``HF_TOKEN``...). Anything that may be
written somewhere a person or a registry can read should pass through:

* :func:`redact_uri` — one URI: the password (or a bare user-info token)
  becomes ``***``, and so does the value of every query or fragment parameter
  whose name looks secret (``token``, ``password``, ``key``, ``signature``...).
* :func:`redact_text` — free text: every URI in it as above, ``NAME=value`` /
  ``NAME: value`` pairs whose name looks secret, ``Authorization: Bearer``
  headers, Hugging Face tokens, and any literal occurrence of the value of a
  secret environment variable.
* :func:`redact_mapping` — a params/tags dict: secret-looking keys get
  ``***``; every string value goes through :func:`redact_text`.
* :class:`RedactingFilter` — a :mod:`logging` filter applying
  :func:`redact_text` to every record (install it on the handlers you own).
* :func:`escape_controls` — free text made single-line and unspoofable:
  every control character (C0 incl. newline/CR/tab/ESC, DEL, C1), line and
  paragraph separators and bidi overrides/isolates becomes a visible escape
  (``\\n``, ``\\x1b``, ``\\u202e``), so a value can never forge a row of a
  table or a log line.
* :func:`clean_text` — :func:`redact_text` then :func:`escape_controls`: what
  free text typed by a person (``--reason``, ``--approver``) goes through before
  it reaches a tag, the audit log or lineage.

Only the secret parts change: the rest of a URI or a text is kept byte for
byte, so redacted output stays useful for debugging.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote_plus, urlsplit

MASK = "***"

#: Words of a parameter / variable name that mark its value as a secret
#: (names are split on ``_ - .`` and camelCase: ``MLFLOW_TRACKING_TOKEN``, ``apiKey``, ``X-Amz-Signature``).
SECRET_WORDS = frozenset({"password", "passwd", "pwd", "secret", "token", "apikey", "credential", "credentials", "signature", "sig", "auth", "authorization", "cookie", "privatekey"})
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("account", "key"), ("client", "secret"), ("sas", "token")})

#: Environment variables whose values must never appear in output.
SECRET_ENV = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCESS_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "PGPASSWORD",
    "DATABASE_URL",
    "TASKVEC_AUDIT_URL",
)
_MIN_SECRET_LEN = 4  # shorter env values are not masked literally (too many false hits)

_URI = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>`]+""")
_BEARER = re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=\-]{8,}")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_ASSIGN = re.compile(r"""(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>\s*[=:]\s*)(?P<q>['"]?)(?P<value>[^\s'",;&]+)(?P=q)""")


def _is_secret_name(name: str) -> bool:
    """``token``, ``HF_TOKEN``, ``apiKey``, ``db.password`` are; ``tokenizer``, ``max_tokens``, ``author`` are not."""
    words = [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", str(name))]
    return bool(SECRET_WORDS.intersection(words)) or any(pair in SECRET_PAIRS for pair in zip(words, words[1:]))


_PARAM = re.compile(r"(?P<lead>^|[?&;#])(?P<name>[^=&;#?]+)=(?P<value>[^&;#]*)")


def _redact_params(part: str) -> str:
    """``a=1&token=x`` -> ``a=1&token=***`` (only secret-looking names; everything else byte for byte)."""

    def sub(m: re.Match) -> str:
        name = unquote_plus(m.group("name"))
        if not m.group("value") or not _is_secret_name(name):
            return m.group(0)
        return f"{m.group('lead')}{m.group('name')}={MASK}"

    return _PARAM.sub(sub, part)


def redact_uri(uri: str) -> str:
    """``uri`` with its password, bare user-info token and secret-looking parameters replaced by ``***``.

    Everything else is kept byte for byte (``sqlite:///mlflow.db`` is unchanged).

    >>> redact_uri("postgresql://mlflow:s3cret@db:5432/mlflow")
    'postgresql://mlflow:***@db:5432/mlflow'
    >>> redact_uri("https://host/api?token=abc&x=1")
    'https://host/api?token=***&x=1'
    """
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    scheme, _, rest = uri.partition("://")
    # authority = up to the first / ? or # ; user-info = up to its last @
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if i != -1:
            end = min(end, i)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        user, sep, _password = userinfo.partition(":")
        # user:password -> user:***; a bare user-info may itself be a token (https://TOKEN@host)
        authority = f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}"
    elif "@" in tail and "?" not in tail.split("@", 1)[0] and "#" not in tail.split("@", 1)[0]:
        # a password holding an unescaped '/' (or other junk) breaks parsing: mask conservatively
        authority, tail = MASK, "@" + tail.rsplit("@", 1)[1]
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hashmark, fragment = query.partition("#")
        tail = f"{path}?{_redact_params(query)}" + (f"#{_redact_params(fragment)}" if hashmark else "")
    elif "#" in tail:
        path, _, fragment = tail.partition("#")
        tail = f"{path}#{_redact_params(fragment)}"
    return f"{scheme}://{authority}{tail}"


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret environment variables that are set (long enough to mask safely)."""
    env = os.environ if env is None else env
    values = []
    for name in SECRET_ENV:
        value = env.get(name)
        if value and len(value) >= _MIN_SECRET_LEN:
            values.append(value)
            # a secret URL's own password is a secret too
            if "://" in value:
                try:
                    pw = urlsplit(value).password
                except ValueError:
                    pw = None
                if pw and len(pw) >= _MIN_SECRET_LEN:
                    values.append(pw)
    return sorted(set(values), key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with credentials in URIs, secret assignments, auth headers and known secret values masked.

    ``secrets`` are literal strings to mask; by default the values of the
    secret environment variables (:data:`SECRET_ENV`) that are set.
    """
    if not isinstance(text, str) or not text:
        return text
    for value in secret_values() if secrets is None else sorted(set(secrets), key=len, reverse=True):
        if value:
            text = text.replace(value, MASK)
    text = _URI.sub(lambda m: redact_uri(m.group(0)), text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _HF_TOKEN.sub(MASK, text)

    def assign(m: re.Match) -> str:
        value = m.group("value")
        already = value == MASK or value.startswith(MASK + "\\")  # masked before, then escaped (clean_text twice)
        if not _is_secret_name(m.group("name")) or already or "://" in value or value.lower() in ("bearer", "basic"):
            return m.group(0)
        return f"{m.group('name')}{m.group('sep')}{m.group('q')}{MASK}{m.group('q')}"

    return _ASSIGN.sub(assign, text)


def redact_mapping(data: Mapping, secrets: Iterable[str] | None = None) -> dict:
    """A copy of ``data`` (params, tags, a model card's fields) safe to log, recursively."""
    secrets = list(secret_values() if secrets is None else secrets)
    out = {}
    for key, value in data.items():
        if isinstance(value, str) and _is_secret_name(str(key)) and value and "://" not in value:
            out[key] = MASK
        elif isinstance(value, str):
            out[key] = redact_text(value, secrets)
        elif isinstance(value, Mapping):
            out[key] = redact_mapping(value, secrets)
        elif isinstance(value, (list, tuple)):
            out[key] = type(value)(redact_text(v, secrets) if isinstance(v, str) else redact_mapping(v, secrets) if isinstance(v, Mapping) else v for v in value)
        else:
            out[key] = value
    return out


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with every control / line-breaking / bidi character shown as an escape (``\\n``, ``\\x1b``, ``\\u202e``).

    Printable text, including non-ASCII letters, is kept byte for byte; a
    backslash is left as is (an escaped value may look like a typed one, but
    it can never start a new line or reorder what follows).

    >>> escape_controls("ok\\nseq 9 forged\\x1b[2J")
    'ok\\\\nseq 9 forged\\\\x1b[2J'
    """
    if not isinstance(text, str):
        return text

    def sub(m: re.Match) -> str:
        ch = m.group(0)
        if ch in _NAMED:
            return _NAMED[ch]
        return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"

    return _CONTROL.sub(sub, text)


def clean_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """Free text safe to record: credentials masked (:func:`redact_text`), control characters escaped."""
    if not isinstance(text, str):
        return text
    return escape_controls(redact_text(text, secrets))


def clean_data(value, secrets: Iterable[str] | None = None):
    """:func:`clean_text` applied to every string (keys and values) of a JSON-like structure."""
    if isinstance(value, str):
        return clean_text(value, secrets)
    if isinstance(value, Mapping):
        return {clean_text(k, secrets) if isinstance(k, str) else k: clean_data(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clean_data(v, secrets) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that masks credentials in every record's rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logging's problem, not ours
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


__all__ = ["MASK", "RedactingFilter", "clean_data", "clean_text", "escape_controls", "redact_mapping", "redact_text", "redact_uri", "secret_values"]
