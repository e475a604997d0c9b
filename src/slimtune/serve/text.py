"""One choice's text as its tokens arrive: decoded, cut at the first stop string, and released
to a stream only when no stop string can still begin in it; and OpenAI's log-probability shapes.

    c = Choice(tokenizer, stops=["\\n\\n"], live=True)
    c.add(token); c.release()      # text safe to send now ("" while a stop string may be forming)
    c.stopped                      # a stop string is complete: cancel the row
    c.finish("length")             # the rest; c.text is the whole answer, the stop string cut off

Decoding is of the whole sequence each time (a token can complete a character another began),
and text ending in an incomplete character (U+FFFD) waits for the next token. As OpenAI does,
the stop string and everything after it are dropped, and the finish reason is "stop". A stream
holds back the longest tail of the text that is the beginning of a stop string until the next
tokens settle it: either the stop string completes (and the held text is never sent) or the
text moves on (and it is sent). Without a stream and without stop strings nothing is decoded
until the end.
"""

from __future__ import annotations


class Choice:
    def __init__(self, tokenizer, stops: list[str], live: bool = False):
        self.tok, self.stops = tokenizer, stops
        self.live = live or bool(stops)  # decode as tokens come (streaming, or looking for stops)
        self.ids: list[int] = []
        self.full = ""  # the decoded text, up to its last complete character
        self.sent = 0  # characters released
        self.end: int | None = None  # where the first stop string begins, once one is complete
        self.finish_reason: str | None = None
        self.lp_sent = 0  # tokens whose log-probabilities went out
        self.offset = 0  # characters those tokens make (completions' text_offset)

    @property
    def stopped(self) -> bool:
        return self.end is not None

    @property
    def text(self) -> str:
        return self.full if self.end is None else self.full[: self.end]

    def add(self, token: int) -> None:
        if self.stopped or self.finish_reason is not None:
            return  # tokens decoded after the stop string, before the row left the batch
        self.ids.append(token)
        if self.live:
            text = self._decode()
            if not text.endswith("\ufffd"):  # an incomplete character: wait for the rest
                self._update(text)

    def release(self) -> str:
        """The text that may go out now: up to a complete stop string, or else all but the tail
        that could still become one."""
        upto = self.end if self.stopped else len(self.full) - self._held()
        out = self.full[self.sent: upto]
        self.sent = max(self.sent, upto)
        return out

    def finish(self, reason: str) -> str:
        """End the choice (`reason` unless a stop string ended it) and return the unreleased rest."""
        if self.finish_reason is None:
            if not self.stopped:
                self._update(self._decode())
            self.finish_reason = "stop" if self.stopped else reason
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out

    def _decode(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def _update(self, text: str) -> None:
        self.full = text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.end = max(min(hits), self.sent)  # never take back text already sent

    def _held(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        longest = max((len(s) for s in self.stops), default=1)
        for k in range(min(longest - 1, len(self.full)), 0, -1):
            tail = self.full[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    # ---- log-probabilities ------------------------------------------------------------------
    def logprobs(self, steps: list, chat: bool) -> dict | None:
        """OpenAI's logprobs object for the tokens not yet reported (`steps[i]`: the i-th token's
        (log-probability, [(id, log-probability) of the most likely ones])); None when the
        request asked for none."""
        if steps is None:
            return None
        n = len(self.ids)
        ids, got = self.ids[self.lp_sent: n], steps[self.lp_sent: n]
        self.lp_sent = n
        strings = [self.tok.decode([t]) for t in ids]
        if chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()),
                                 "top_logprobs": [_entry(self.tok.decode([t]), x) for t, x in top]}
                                for s, (lp, top) in zip(strings, got)]}
        offsets = []
        for s in strings:
            offsets.append(self.offset)
            self.offset += len(s)
        tops = [{**{self.tok.decode([t]): x for t, x in top}, s: lp} for s, (lp, top) in zip(strings, got)]
        return {"tokens": strings, "token_logprobs": [lp for lp, _ in got], "top_logprobs": tops, "text_offset": offsets}


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
