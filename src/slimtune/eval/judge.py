"""A judge model behind any OpenAI-compatible endpoint (`POST {base_url}/chat/completions`).

- `single`: an MT-Bench-style 1-10 score of one answer;
- `pairwise`: which of two answers is better, the order randomised per question, a tie
  counting 0.5 to each side.
JSON output is requested (`response_format: json_object`) and dropped once if the server
rejects it; verdicts that cannot be parsed are counted, never guessed.
"""

from __future__ import annotations

import json
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

SINGLE = ("Please act as an impartial judge and evaluate the quality of the response provided by an AI "
          "assistant to the user question below. Consider helpfulness, relevance, accuracy, depth and detail. "
          "{ref}Reply with a JSON object {{\"explanation\": <one sentence>, \"score\": <integer 1 to 10>}}.\n\n"
          "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")
PAIR = ("Please act as an impartial judge and compare the two AI assistants' responses to the user question "
        "below. Do not let the order or length of the responses influence you. Reply with a JSON object "
        "{{\"explanation\": <one sentence>, \"winner\": \"A\" or \"B\" or \"tie\"}}.\n\n[Question]\n{question}\n\n"
        "[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")


@dataclass
class Judge:
    base_url: str  # e.g. http://127.0.0.1:8080/v1
    model: str = "judge"
    api_key: str | None = None
    json_mode: bool = True
    timeout: float = 120.0
    max_tokens: int = 256
    unparseable: int = 0
    raw: list = field(default_factory=list)  # every verdict text, for the record

    def ask(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": self.max_tokens}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        req = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json",
                                      **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                reply = json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            if self.json_mode and e.code in (400, 422):  # the server does not do JSON mode: ask without it
                self.json_mode = False
                return self.ask(prompt)
            raise
        text = reply["choices"][0]["message"]["content"] or ""
        self.raw.append(text)
        return text

    def single(self, question: str, answer: str, reference: str | None = None) -> int | None:
        ref = f"Compare with the reference answer: {reference}\n" if reference else ""
        verdict = _field(self.ask(SINGLE.format(ref=ref, question=question, answer=answer)), "score")
        try:
            value = int(float(verdict))
        except (TypeError, ValueError):
            value = None
        if value is None or not 1 <= value <= 10:
            self.unparseable += 1
            return None
        return value

    def pairwise(self, question: str, ours: str, theirs: str, rng: random.Random) -> float | None:
        """1 if `ours` wins, 0 if it loses, 0.5 for a tie, None if the verdict is unreadable."""
        swap = rng.random() < 0.5
        a, b = (theirs, ours) if swap else (ours, theirs)
        verdict = str(_field(self.ask(PAIR.format(question=question, a=a, b=b)), "winner") or "").strip().lower()
        if verdict not in ("a", "b", "tie"):
            self.unparseable += 1
            return None
        if verdict == "tie":
            return 0.5
        return float((verdict == "a") != swap)


def _field(text: str, key: str):
    """`key` from a JSON object in the text (fenced or not), else from [[...]] (MT-Bench style)."""
    for candidate in [text] + re.findall(r"\{.*?\}", text, re.S):
        try:
            obj = json.loads(candidate.strip().strip("`").removeprefix("json"))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and key in obj:
            return obj[key]
    m = re.search(r"\[\[([^\]]+)\]\]", text) or re.search(rf'"?{key}"?\s*[:=]\s*"?([\w.]+)', text, re.I)
    return m.group(1) if m else None
