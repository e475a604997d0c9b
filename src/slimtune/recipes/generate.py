"""`slimtune generate`: answers from a base model and any adapter directory."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters.gist import gist_tokens
from ..data.rows import Example
from ..errors import Problems
from ..eval.config import GenerateConfig
from ..eval.generation import generate
from ..formats.adapter import load_adapter
from ..models.load import load_model, load_tokenizer, resolve_device
from ..models.quantize import quantize_model


def prompts_of(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            p = Problems("cannot read the prompts")
            p.add(f"file={cfg.file!r}", "a directory, not a file" if path.is_dir() else "no such file",
                  "give a text file with one prompt per line")
            p.raise_if_any()
        prompts += [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return prompts


def gist_template(model, template: str):
    """(template, gist tokens): an adapter trained with gist tokens answers with the gist template
    (the default `chat` switches to it); the gist template needs such an adapter."""
    gist = gist_tokens(model)
    if gist is not None and template == "chat":
        template = "gist"
    if template == "gist" and gist is None:
        p = Problems("the gist template needs gist tokens")
        p.add("template='gist'", "the model's adapter was not trained with gist tokens",
              "load an adapter trained with `slimtune train --gist K`, or use another template")
        p.raise_if_any()
    return template, gist if template == "gist" else None


def run_generate(cfg: GenerateConfig) -> list[dict]:
    """[{prompt, response}] for every prompt of cfg."""
    prompts = prompts_of(cfg)
    device = resolve_device(cfg.device)
    model = load_model(cfg.model).to(device)
    quantize_model(model, cfg.quantize)
    tok = load_tokenizer(cfg.model)
    if cfg.adapter:
        load_adapter(model, cfg.adapter, tokenizer=tok)
    template, gist = gist_template(model, cfg.template)
    examples = [Example([{"role": "user", "content": p}], "", p) for p in prompts]
    outs = generate(model, tok, examples, template, cfg.max_new_tokens, cfg.batch_size, cfg.do_sample,
                    cfg.temperature, cfg.top_p, cfg.seed, gist=gist)
    return [{"prompt": p, "response": o} for p, o in zip(prompts, outs)]


def print_answers(answers: list[dict], jsonl: bool) -> None:
    for a in answers:
        print(json.dumps(a, ensure_ascii=False) if jsonl else f"> {a['prompt']}\n{a['response']}\n")
