"""Keep data keys, plaintext and credentials out of every log, whatever the log level.

At DEBUG, botocore logs request parameters and raw response bodies: the ``Plaintext``
of Encrypt requests and of GenerateDataKey and Decrypt responses (kmsguard's data
keys), and STS's ``SecretAccessKey`` and ``SessionToken``. :class:`RedactingFilter`
rewrites such records at their source logger, before any handler sees them, so
turning botocore logging up (``boto3.set_stream_logger("")``) cannot leak them.

A logger filter only sees records logged by that very logger, so the filter is put on
every botocore, boto3 and urllib3 logger that exists, and again each time kmsguard
builds a client (after which every module botocore uses has been imported).
"""

from __future__ import annotations

import logging
import re

#: Fields whose values must never be logged, in JSON bodies, dict reprs and headers.
SENSITIVE_FIELDS = ("Plaintext", "SecretAccessKey", "SessionToken", "SecretKey", "X-Amz-Security-Token")
_LOGGER_PREFIXES = ("botocore", "boto3", "urllib3", "s3transfer")

_names = "|".join(SENSITIVE_FIELDS)
# "Plaintext": "..."  or  \"Plaintext\": \"...\" (JSON inside a bytes repr)
_JSON = re.compile(rf'(\\?"(?:{_names})\\?"\s*:\s*\\?")(?:[^"\\]|\\(?!"))*(\\?")', re.IGNORECASE)
# 'Plaintext': b'...'  /  'Plaintext': '...'  (a Python dict repr)
_REPR = re.compile(rf"""('(?:{_names})'\s*:\s*b?)('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""", re.IGNORECASE)
# <SessionToken>...</SessionToken> (STS's XML)
_XML = re.compile(rf"(<({_names})>)[^<]*(</\2>)", re.IGNORECASE)
# Plaintext=... in a form-encoded body or a header line
_FORM = re.compile(rf"(\b(?:{_names})[=:]\s*)[^&\s,'\"]+", re.IGNORECASE)

REDACTED = "<redacted>"


def redact(text: str) -> str:
    """``text`` with the value of every sensitive field replaced by ``<redacted>``."""
    text = _JSON.sub(rf"\g<1>{REDACTED}\g<2>", text)
    text = _REPR.sub(rf"\g<1>'{REDACTED}'", text)
    text = _XML.sub(rf"\g<1>{REDACTED}\g<3>", text)
    return _FORM.sub(rf"\g<1>{REDACTED}", text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and drops its args) when it names a sensitive field."""

    _needle = re.compile("|".join(SENSITIVE_FIELDS), re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the logger's problem, but never leak its args
            record.msg, record.args = "<unformattable log record>", None
            return True
        if self._needle.search(message):
            record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_text is None and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if self._needle.search(text):
                record.exc_text, record.exc_info = redact(text), None
        return True


_FILTER = RedactingFilter()


def install() -> None:
    """Put the filter on every botocore/boto3/urllib3 logger that exists now. Idempotent."""
    manager = logging.Logger.manager
    names = [n for n in list(manager.loggerDict) if n.split(".")[0] in _LOGGER_PREFIXES]
    for name in {*names, *_LOGGER_PREFIXES}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
