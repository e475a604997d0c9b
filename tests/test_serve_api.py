"""What clients send, for real: each OpenAI field the server implements, through the `openai`
client against uvicorn on 127.0.0.1, checked against a reference computed here (transformers'
`generate` on a separate copy of the model, with OpenAI's formulas as logits processors)."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import slimtune
from slimtune.serve.config import ServeConfig
from slimtune.serve.server import Server
from test_serve import PROMPTS, save_perturbed

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-adapters")
    g = torch.Generator().manual_seed(1)
    return {"lora": save_perturbed(tiny_dir, "lora", root / "lora", g),
            "vera": save_perturbed(tiny_dir, "vera", root / "vera", g)}


@pytest.fixture(scope="module")
def server(tiny_dir, adapters):
    s = Server.start(ServeConfig(model=tiny_dir, adapter=[f"{k}={v}" for k, v in adapters.items()], port=0,
                                 max_batch=16, max_queue=64, max_tokens=64))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_dir, adapters):
    """(model, tokenizer) with one adapter, for the references."""
    models = {}

    def get(adapter):
        if adapter not in models:
            model, tok = slimtune.load_model(tiny_dir).eval(), slimtune.load_tokenizer(tiny_dir)
            slimtune.load_adapter(model, adapters[adapter], tokenizer=tok)
            models[adapter] = (model, tok)
        return models[adapter]

    return get


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's formula: logit[j] -= frequency * count[j] + presence * (count[j] > 0), counts over
    the generated tokens only; then the logit bias."""

    def __init__(self, prompt_len: int, presence: float, frequency: float, bias: dict[int, float]):
        self.prompt_len, self.presence, self.frequency, self.bias = prompt_len, presence, frequency, bias

    def __call__(self, input_ids, scores):
        count = torch.zeros_like(scores)
        gen = input_ids[:, self.prompt_len:]
        count.scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
        scores = scores - self.frequency * count - self.presence * (count > 0).to(scores.dtype)
        for t, b in self.bias.items():
            scores[:, t] += b
        return scores


@torch.no_grad()
def generate(model, tok, ids: list[int], max_tokens: int, processor=None) -> list[int]:
    """Greedy tokens after `ids`, up to EOS (excluded)."""
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, top_k=None, top_p=None,
                         temperature=None, logits_processor=LogitsProcessorList([processor] if processor else []))
    out = out[0, x.shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def greedy(client, prompt: str, max_tokens: int = 24, model: str = "lora", **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def boundary_stop(reference, prompt: str, max_tokens: int = 24) -> tuple[str, str]:
    """(the greedy text, a 3-character stop string in it that spans two tokens, first found there)."""
    model, tok = reference("lora")
    ids = generate(model, tok, tok(prompt)["input_ids"], max_tokens)
    text = tok.decode(ids, skip_special_tokens=True)
    for k in range(1, len(ids)):
        cut = len(tok.decode(ids[:k], skip_special_tokens=True))
        stop = text[cut - 1: cut + 2]
        if cut >= 2 and len(stop) == 3 and text.find(stop) == cut - 1:
            return text, stop
    pytest.skip("no stop string spanning two tokens in this answer")


# ---- stop ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_a_stop_string_and_what_follows_are_dropped_streamed_or_not(client, reference, prompt):
    text, stop = boundary_stop(reference, prompt)
    want = text[: text.find(stop)]
    got = greedy(client, prompt, stop=[stop, "never-there"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    chunks = list(greedy(client, prompt, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want  # the stop string's start was held back, never sent
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a stop string whose beginning appears but which never completes: held, then sent
    chunks = list(greedy(client, prompt, stop=stop + "\x00", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text


def test_chat_stops_too(client, reference):
    model, tok = reference("lora")
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    text = tok.decode(generate(model, tok, ids, 16), skip_special_tokens=True)
    stop = text[3:5]
    got = client.chat.completions.create(model="lora", messages=msgs, max_tokens=16, temperature=0, stop=stop)
    assert got.choices[0].message.content == text[: text.find(stop)] and got.choices[0].finish_reason == "stop"


# ---- stream_options ----------------------------------------------------------------------------
def test_include_usage_sends_a_last_chunk_with_usage_and_no_choices(client):
    plain = greedy(client, PROMPTS[0], 12)
    chunks = list(greedy(client, PROMPTS[0], 12, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    chat = list(client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                               stream=True, stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.total_tokens > 0
    assert all(c.usage is None for c in greedy(client, PROMPTS[0], 4, stream=True))  # not asked: none


# ---- chat messages ------------------------------------------------------------------------------
def test_content_parts_are_joined_and_developer_is_system(client):
    def answer(messages):
        return client.chat.completions.create(model="vera", messages=messages, max_tokens=8,
                                              temperature=0).choices[0].message.content

    parts = answer([{"role": "user", "content": [{"type": "text", "text": "Add 2"},
                                                 {"type": "text", "text": "and 5"}]}])
    assert parts == answer([{"role": "user", "content": "Add 2\nand 5"}])
    dev = answer([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert dev == answer([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        answer([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert e.value.param == "messages" and "image_url" in e.value.message


# ---- n, and prompt batches ----------------------------------------------------------------------
def test_n_choices_and_prompt_batches_each_equal_the_request_alone(client, reference):
    model, tok = reference("lora")
    alone = [tok.decode(generate(model, tok, tok(p)["input_ids"], 8), skip_special_tokens=True) for p in PROMPTS[:3]]
    got = greedy(client, PROMPTS[0], 8, n=3)
    assert [c.index for c in got.choices] == [0, 1, 2] and {c.text for c in got.choices} == {alone[0]}
    assert got.usage.completion_tokens == 3 * greedy(client, PROMPTS[0], 8).usage.completion_tokens
    got = greedy(client, PROMPTS[:3], 8)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == alone
    got = greedy(client, PROMPTS[:2], 8, n=2)  # OpenAI's order: prompt by prompt, n choices each
    assert [c.text for c in got.choices] == [alone[0], alone[0], alone[1], alone[1]]
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    assert greedy(client, ids[0], 8).choices[0].text == alone[0]  # token ids
    assert [c.text for c in greedy(client, ids, 8).choices] == alone[:2]  # lists of token ids
    texts = {}
    for c in greedy(client, PROMPTS[:2], 8, n=2, stream=True):
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert texts == {0: alone[0], 1: alone[0], 2: alone[1], 3: alone[1]}
    sampled = client.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=8, n=4, seed=3, temperature=1.5)
    assert len({c.text for c in sampled.choices}) > 1  # a seed per choice: sampled choices differ


# ---- logprobs ----------------------------------------------------------------------------------
@torch.no_grad()
def model_logprobs(model, ids: list[int], new: list[int]) -> torch.Tensor:
    """(len(new), V) the model's log-probabilities at each generated position."""
    logits = model(input_ids=torch.tensor([ids + new])).logits[0, len(ids) - 1: len(ids) + len(new) - 1]
    return torch.log_softmax(logits.float(), -1)


def test_logprobs_are_the_models_in_openais_shapes(client, reference):
    model, tok = reference("lora")
    ids = tok(PROMPTS[2])["input_ids"]
    got = greedy(client, PROMPTS[2], 6, logprobs=2).choices[0]
    new = generate(model, tok, ids, 6)
    lp = model_logprobs(model, ids, new)
    assert got.logprobs.tokens == [tok.decode([t]) for t in new]
    assert got.logprobs.token_logprobs == pytest.approx([float(lp[i, t]) for i, t in enumerate(new)], abs=1e-3)
    for i, top in enumerate(got.logprobs.top_logprobs):
        best = lp[i].topk(2)
        assert len(top) <= 3 and max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-3)
    assert got.logprobs.text_offset[0] == 0 and got.logprobs.text_offset == sorted(got.logprobs.text_offset)
    msgs = [{"role": "user", "content": PROMPTS[2]}]
    chat = client.chat.completions.create(model="lora", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=3).choices[0]
    cids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    new = generate(model, tok, cids, 5)
    lp = model_logprobs(model, cids, new)
    assert [c.logprob for c in chat.logprobs.content] == pytest.approx([float(lp[i, t]) for i, t in enumerate(new)],
                                                                      abs=1e-3)
    for i, c in enumerate(chat.logprobs.content):
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(lp[i].topk(3).values.tolist(), abs=1e-3)
        assert c.bytes == list(c.token.encode())
    assert client.chat.completions.create(model="lora", messages=msgs, max_tokens=2).choices[0].logprobs is None
    streamed = [c.choices[0].logprobs for c in greedy(client, PROMPTS[2], 6, logprobs=1, stream=True) if c.choices]
    assert sum(len(x.tokens) for x in streamed) == len(got.logprobs.tokens)


# ---- penalties and logit_bias -------------------------------------------------------------------
def test_penalties_and_logit_bias_follow_openais_formula(client, reference):
    model, tok = reference("lora")
    ids = tok(PROMPTS[5])["input_ids"]
    plain = greedy(client, PROMPTS[5], 24).choices[0].text
    for presence, frequency in [(0.0, 2.0), (1.5, 0.0), (-1.0, 0.5)]:
        want = tok.decode(generate(model, tok, ids, 24, OpenAIPenalties(len(ids), presence, frequency, {})),
                          skip_special_tokens=True)
        got = greedy(client, PROMPTS[5], 24, presence_penalty=presence, frequency_penalty=frequency).choices[0].text
        assert got == want
    assert greedy(client, PROMPTS[5], 24, frequency_penalty=2.0).choices[0].text != plain  # it does something
    bias = {tok("cat")["input_ids"][0]: 100.0, tok(" the")["input_ids"][0]: -100.0}
    want = tok.decode(generate(model, tok, ids, 8, OpenAIPenalties(len(ids), 0.0, 0.0, bias)), skip_special_tokens=True)
    got = greedy(client, PROMPTS[5], 8, logit_bias={str(k): v for k, v in bias.items()}).choices[0].text
    assert got == want and got.startswith(tok.decode([next(iter(bias))]))


# ---- what is refused ----------------------------------------------------------------------------
REFUSED_COMPLETIONS = [dict(suffix="!"), dict(echo=True), dict(best_of=2), dict(extra_body={"top_k": 5}),
                       dict(extra_body={"repetition_penalty": 1.2})]
REFUSED_CHAT = [dict(response_format={"type": "json_object"}),
                dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                dict(tool_choice="auto"), dict(functions=[{"name": "f", "parameters": {}}]),
                dict(reasoning_effort="high")]


@pytest.mark.parametrize("kw", REFUSED_COMPLETIONS, ids=lambda kw: next(iter(kw.get("extra_body", kw))))
def test_completion_fields_that_would_change_the_answer_are_refused_by_name(client, kw):
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, "x", 2, **kw)
    assert e.value.param == next(iter(kw.get("extra_body", kw)))


@pytest.mark.parametrize("kw", REFUSED_CHAT, ids=lambda kw: next(iter(kw)))
def test_chat_fields_that_would_change_the_answer_are_refused_by_name(client, kw):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "x"}], max_tokens=2, **kw)
    assert e.value.param == next(iter(kw))


def test_fields_that_change_nothing_are_accepted(client):
    got = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                         user="me", response_format={"type": "text"},
                                         extra_body={"metadata": {"k": "v"}})
    assert got.choices[0].finish_reason in ("stop", "length")
    assert greedy(client, "x", 2, n=2, best_of=2).choices[1].index == 1
