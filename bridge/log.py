"""Logging: structlog, JSON lines for machines or console lines for people, on stderr.

Secrets are scrubbed in one place, a processor that every log line passes through,
including the lines of pika and websocket-client, which go through the same pipeline.
The scrubber also serves error messages that are not log lines (`scrub`).
"""

from __future__ import annotations

import base64
import logging
import sys
from urllib.parse import quote, quote_plus

import structlog

REDACTED = "***"
_secrets: tuple[str, ...] = ()
_registered: tuple[str, ...] = ()


def _variants(secret: str) -> set[str]:
    """The forms a secret can take on its way out: raw, URL-encoded, inside Basic auth."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret)}
    forms.add(base64.b64encode(secret.encode()).decode().rstrip("="))
    return {f for f in forms if len(f) >= 3}


def set_secrets(secrets: tuple[str, ...] | list[str]) -> None:
    """Register values that must never be printed."""
    global _secrets, _registered
    _registered = tuple(secrets)
    forms: set[str] = set()
    for secret in secrets:
        if secret:
            forms |= _variants(secret)
    _secrets = tuple(sorted(forms, key=len, reverse=True))


def add_secrets(secrets: tuple[str, ...] | list[str]) -> None:
    """Register more values that must never be printed (a rotated password)."""
    new = [s for s in secrets if s and s not in _registered]
    if new:
        set_secrets(_registered + tuple(new))


def scrub(text: str, secrets: tuple[str, ...] | None = None) -> str:
    """`text` without the registered secrets (or without `secrets`, in any of their forms)."""
    forms = _secrets if secrets is None else sorted(
        {f for s in secrets if s for f in _variants(s)}, key=len, reverse=True)
    for secret in forms:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _scrub_value(value: object) -> object:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, (list, tuple)):
        return [_scrub_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}")
    return value


def _scrub_processor(_logger, _method, event_dict):
    if _secrets:
        for key, value in event_dict.items():
            event_dict[key] = _scrub_value(value)
    return event_dict


def configure(level: str = "info", fmt: str = "json") -> None:
    """Send structlog and the standard library's loggers through one scrubbed pipeline."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _scrub_processor,
    ]
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                                   exception_formatter=structlog.dev.plain_traceback))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The libraries narrate every connection step, with tracebacks on failure; the
    # bridge logs its own one-line view of those steps, so theirs only shows up on
    # LOG_LEVEL=debug.
    # Their failures also reach the bridge as exceptions, which it logs in one line.
    for noisy in ("pika", "websocket"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
    structlog.configure(
        processors=shared + [structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )


def get(name: str):
    return structlog.get_logger(name)
