"""Send poolguard events to a chat webhook (Slack incoming webhooks, Mattermost, or a Telegram
bot's sendMessage): one JSON POST per event, at most one per kind per ``event_interval``.

    import poolguard
    from webhook import chat_webhook

    poolguard.configure(on_event=chat_webhook("https://hooks.slack.com/services/..."))

Telegram: ``chat_webhook(f"https://api.telegram.org/bot{token}/sendMessage",
extra={"chat_id": chat_id})``.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import poolguard

logger = logging.getLogger("poolguard.alerts")


def chat_webhook(
    url: str, *, extra: Mapping[str, Any] | None = None, timeout: float = 5.0
) -> Callable[[poolguard.PoolEvent], None]:
    """An on_event hook that POSTs ``{"text": ..., **extra}`` as JSON to ``url``."""

    def post(event: poolguard.PoolEvent) -> None:
        where = f" (at {event.site}, held {event.age:.1f} s)" if event.site and event.age else ""
        skipped = f" [+{event.suppressed} more since the last one]" if event.suppressed else ""
        text = f"poolguard {event.kind} in pool {event.pool!r}: {event.message}{where}{skipped}"
        body = json.dumps({"text": text, **(extra or {})}).encode()
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
        except OSError as exc:  # the alert is lost, the app goes on
            # The host only: webhook URLs carry their secret token in the path.
            logger.warning("webhook to %s failed: %s", urllib.parse.urlsplit(url).hostname, exc)

    return post
