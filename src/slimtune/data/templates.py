"""Templates: how an example becomes a prompt and a response.

- `chat`: the tokenizer's own chat template (the response is what the template adds for the
  assistant turn, end-of-turn marker included);
- `alpaca`: the Stanford Alpaca prompt, response + EOS;
- `gist`: `Instruction: {instruction}\\n{gists}\\nInput: {input}\\nOutput:` (Mu et al. 2023;
  the Input line is omitted when empty), response + EOS.
"""

from __future__ import annotations

from ..errors import Problems
from .rows import Example

ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
TEMPLATES = ("chat", "alpaca", "gist")
GIST_TOKEN = "<GIST>"


def gist_prompt(instruction: str, input: str, num_gist: int) -> tuple[str, str]:
    """The gist template's prompt in two parts: the instruction ending with the k gists (what a
    gist cache compresses), and the rest (the input, and `Output:`)."""
    return f"Instruction: {instruction}\n{GIST_TOKEN * num_gist}", (f"\nInput: {input}" if input else "") + "\nOutput:"


def format_example(ex: Example, template: str, tokenizer, num_gist: int = 1) -> tuple[str, str]:
    """(prompt text, response text) of one example."""
    eos = tokenizer.eos_token or ""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            p = Problems("no chat template")
            p.add(f"template='chat' with tokenizer {type(tokenizer).__name__}", "the tokenizer has no chat template",
                  "use --template alpaca (or gist), or a tokenizer that has one")
            p.raise_if_any()
        prompt = tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(ex.messages + [{"role": "assistant", "content": ex.response}],
                                             tokenize=False)
        if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to the answer + EOS
            return prompt, ex.response + eos
        return prompt, full[len(prompt):]
    instruction = ex.instruction if ex.instruction is not None else "\n\n".join(m["content"] for m in ex.messages)
    if template == "alpaca":
        ctx = ", paired with an input that provides further context" if ex.input else ""
        inp = f"### Input:\n{ex.input}\n\n" if ex.input else ""
        return ALPACA.format(ctx=ctx, instruction=instruction, input=inp), ex.response + eos
    if template == "gist":
        before, after = gist_prompt(instruction, ex.input, num_gist)
        return before + after, " " + ex.response + eos
    p = Problems("unknown template")
    p.add(f"template={template!r}", "not a template slimtune knows", f"use one of {list(TEMPLATES)}")
    p.raise_if_any()
