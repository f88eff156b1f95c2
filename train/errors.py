"""One-line summaries of exceptions for reports and error messages."""

from __future__ import annotations

import re


def short_error(error: BaseException, limit: int = 400, first_line: bool = False) -> str:
    """`Type: message` on one line (whitespace runs collapsed; only the message's first line when
    first_line), cut to `limit` characters with "..."."""
    message = str(error).strip()
    if first_line:
        message = message.splitlines()[0] if message else ""
    text = re.sub(r"\s+", " ", f"{type(error).__name__}: {message}").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
