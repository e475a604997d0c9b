"""The OpenAI API's request bodies as pydantic models, and its error shape.

    body = parse_body(raw_bytes, CompletionRequest, Bounds(vocab=49152, max_tokens=512))
    # or ApiError(400, "'temperature': Input should be a finite number (got nan)", param="temperature")

The models follow OpenAI's field names and types (vLLM's `protocol.py` was the reference);
pydantic checks every type and range, and a failure becomes one 400 in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, whose message lists every problem at once and
whose `param` names the first field at fault. Parsing the raw bytes with pydantic's own JSON
parser (not `json.loads`) also refuses, as 400s, what would otherwise fail deep inside the
server: nesting deeper than the parser's limit, lone UTF-16 surrogates ("\\ud800") that no
tokenizer can encode, and NaN or infinite numbers.

Fields that change the answer are never ignored: the supported ones are implemented, and the
others (tools, response_format other than text, suffix, echo, best_of other than n, and vLLM's
sampling extensions) are refused by name. Other unknown fields (`user`, `metadata`, ...) are
allowed and ignored, as they change nothing.
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, \
    ValidationInfo, field_validator

MAX_N = 8  # choices per prompt
MAX_PROMPTS = 32  # prompts in one /v1/completions batch
MAX_STOPS = 4  # as OpenAI
MAX_TOP_LOGPROBS = {"completions": 5, "chat": 20}  # as OpenAI

Int64 = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0, allow_inf_nan=False)]


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Bounds:
    """What a request may ask of this server (the validators read it from pydantic's context)."""

    vocab: int  # token ids are 0..vocab-1
    max_tokens: int


def _bounds(info: ValidationInfo) -> Bounds | None:
    return (info.context or {}).get("bounds")


def _within_max_tokens(v: int | None, info: ValidationInfo) -> int | None:
    b = _bounds(info)
    if v is not None and not 1 <= v <= (b.max_tokens if b else v):
        raise ValueError(f"must be 1..{b.max_tokens if b else 'max'} on this server (--max_tokens), got {v}")
    return v


# Fields that would change the answer and are not implemented, with the values that change
# nothing (some clients send them as defaults): any other value is refused by name.
REFUSED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
    "suffix": (None, ""), "echo": (None, False), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,),
    "web_search_options": (None,),
    # vLLM's sampling extensions
    "top_k": (None, 0, -1), "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0), "min_tokens": (None, 0),
    "use_beam_search": (None, False), "prompt_logprobs": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "structured_outputs": (None,),
    "bad_words": (None, []), "allowed_token_ids": (None,), "stop_token_ids": (None, []),
    "include_stop_str_in_output": (None, False),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = None


class SamplingRequest(BaseModel):
    """What /v1/completions and /v1/chat/completions share. Every field may be null (its default)."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(strict=True, min_length=1, max_length=512)]
    max_tokens: StrictInt | None = None
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_N)] | None = None
    best_of: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    stop: Annotated[list[StrictStr], Field(max_length=MAX_STOPS)] = []  # a string, or a list of up to 4
    seed: Int64 | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[int, Annotated[float, Field(strict=True, ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = None
    ignore_eos: StrictBool | None = None  # vLLM's extension, for benchmarks: generate max_tokens whatever comes

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None, info: ValidationInfo) -> int | None:
        return _within_max_tokens(v, info)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v not in (None, 1, info.data.get("n") or 1):
            raise ValueError(f"best_of={v} is not supported by this server: only best_of = n (each choice is "
                             "returned); ask for n choices instead")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when 'stream' is true")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        v = [] if v is None else [v] if isinstance(v, str) else v
        if isinstance(v, list) and "" in v:
            raise ValueError("a stop string must not be empty")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, v: Any, info: ValidationInfo) -> Any:
        """Keys are token ids written as strings (JSON has no other keys): made ints here."""
        if not isinstance(v, dict):
            return v
        b = _bounds(info)
        for key in v:
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and (b is None or int(key) < b.vocab)):
                raise ValueError(f"keys are token ids, 0..{b.vocab - 1 if b else 'vocab-1'}; got {_short(key)}")
        return {int(k): x for k, x in v.items()}

    def refused(self) -> None:
        """An ApiError naming the first field that would change the answer but is not implemented."""
        for name, harmless in REFUSED.items():
            value = (self.model_extra or {}).get(name)
            if not any(value == h and type(value) is type(h) for h in harmless):
                raise ApiError(400, f"{name!r} is not supported by this server (got {_short(value)})", name,
                               "unsupported_parameter")


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. `prompt`: a string, a list of strings (a batch: one choice per
    prompt, in order), a list of token ids, or a list of lists of token ids."""

    prompt: list[str | list[int]]
    logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS["completions"])] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any, info: ValidationInfo) -> list:
        def ids(x) -> bool:
            return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)

        if isinstance(v, str):
            v = [v]
        elif ids(v):
            v = [v]
        elif not (isinstance(v, list) and v and (all(isinstance(x, str) for x in v) or all(ids(x) for x in v))):
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of lists of "
                             f"token ids (got {_short(v)})")
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
        b = _bounds(info)
        if b is not None and any(not 0 <= t < b.vocab for x in v if isinstance(x, list) for t in x):
            raise ValueError(f"token ids must be 0..{b.vocab - 1}")
        return v


class ChatMessage(BaseModel):
    """One message. `content`: a string, or a list of parts of which only text parts are
    accepted (joined with newlines, as vLLM does). `developer` is OpenAI's newer name for
    `system`, and is treated as such."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = None
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> str | None:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(f"must be a string or a list of {{'type': 'text', 'text': ...}} parts (got {_short(v)})")
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"part {i} is of type {_short(kind)}: only 'text' parts are supported by this "
                                 "server (no images, audio or files)")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} has no 'text' string")
            texts.append(part["text"])
        return "\n".join(texts)

    def refused(self, i: int) -> None:
        for name in ("tool_calls", "tool_call_id", "function_call", "audio", "refusal"):
            if (self.model_extra or {}).get(name) not in (None, []):
                raise ApiError(400, f"messages[{i}].{name} is not supported by this server (no tools)", "messages",
                               "unsupported_parameter")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS["chat"])] | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, v: int | None, info: ValidationInfo) -> int | None:
        return _within_max_tokens(v, info)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs 'logprobs': true")
        return v

    def refused(self) -> None:
        super().refused()
        for i, m in enumerate(self.messages):
            m.refused(i)


class AdapterRequest(BaseModel):
    """POST /v1/adapters: register an adapter directory under a name."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    path: Annotated[str, Field(strict=True, min_length=1, max_length=4096)]


def parse_body(raw: bytes, model: type[BaseModel], bounds: Bounds | None = None) -> BaseModel:
    """The request body as `model`, or an ApiError (400) listing what is wrong."""
    try:
        body = model.model_validate_json(raw, context={"bounds": bounds})
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    if hasattr(body, "refused"):
        body.refused()
    return body


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors as one 400: every problem in the message, the first field as `param`."""
    first = errors[0]
    if first["type"] == "json_invalid":
        why = first["msg"].removeprefix("Invalid JSON: ")
        if "escape" in why:  # "\ud800" alone: no tokenizer can encode it
            why += "; text must be valid Unicode, with no lone UTF-16 surrogate such as \\ud800"
        return ApiError(400, f"the body is not valid JSON ({why})")
    if first["type"] == "model_type" and not first["loc"]:
        return ApiError(400, f"the body must be a JSON object (got {_short(first.get('input'))})")
    problems = []
    for e in errors[:8]:
        where = _loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("missing", "value_error") else f" (got {_short(e.get('input'))})"
        problems.append(f"{where!r}: {msg}{got}" if where else f"{msg}{got}")
    param = next((x for x in first["loc"] if isinstance(x, str)), None)
    return ApiError(400, "; ".join(problems), param)


def _loc(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; pydantic's union-branch names dropped."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif not any(c in x for c in "[("):  # a union member's tag, e.g. 'list[str]'
            out += ("." if out else "") + x
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
