"""A minimal client for an OpenAI-compatible chat-completions endpoint (standard library only).

The API key comes from an environment variable and is never written anywhere.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from sweep.errors import SweepError

API_KEY_ENV = "LENS_SWEEP_LLM_API_KEY"


class LLMError(SweepError):
    pass


@dataclass(frozen=True)
class ChatEndpoint:
    url: str  # base URL, e.g. http://127.0.0.1:8000/v1; /chat/completions is appended
    model: str = "gpt-4o"
    timeout_s: float = 300.0

    def complete(self, system: str, user: str) -> str:
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": 0,
        }).encode()  # fmt: skip
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(API_KEY_ENV)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.url.rstrip("/") + "/chat/completions"
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
