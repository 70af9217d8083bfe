"""A minimal client for an OpenAI-compatible chat-completions endpoint (standard library only).

The API key comes from an environment variable and is never written anywhere. A request whose
body holds the value of a secret-looking environment variable (the API key among them) is
refused before anything is sent.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from sweep.errors import SweepError

API_KEY_ENV = "LENS_SWEEP_LLM_API_KEY"
SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
SECRET_MIN_CHARS = 8  # shorter values ("1", "true") would match any text by chance


class LLMError(SweepError):
    pass


def leaked_secret(texts: tuple[str, ...]) -> str | None:
    """The name of a secret-looking environment variable whose value occurs in ``texts``."""
    for name, value in sorted(os.environ.items()):
        looks_secret = any(part in name.upper() for part in SECRET_NAME_PARTS)
        if looks_secret and len(value) >= SECRET_MIN_CHARS and any(value in t for t in texts):
            return name
    return None


@dataclass(frozen=True)
class ChatEndpoint:
    url: str  # base URL, e.g. http://127.0.0.1:8000/v1; /chat/completions is appended
    model: str = "gpt-4o"
    timeout_s: float = 300.0

    def complete(self, system: str, user: str) -> str:
        url = self.url.rstrip("/") + "/chat/completions"
        # Checked on the texts, not the JSON, which would escape quotes and non-ASCII in a value.
        secret = leaked_secret((self.model, system, user))
        if secret is not None:
            raise LLMError(
                f"refusing to send to {url}: the request holds the value of ${secret}; "
                "remove it from the run's files (or unset the variable)"
            )
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": 0,
        }).encode()  # fmt: skip
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(API_KEY_ENV)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise LLMError(f"{url} answered HTTP {exc.code}: {exc.read()[:300]!r}") from None
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
            raise LLMError(f"could not get an answer from {url}: {exc}") from None
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise LLMError(
                f"{url} answered without choices[0].message.content: {str(payload)[:300]}"
            ) from None
