"""What `slimtune eval` and `slimtune generate` do: their typed configs."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import at_least, choice, field
from ..data.templates import TEMPLATES
from ..errors import Problems

QUANTIZE = ("none", "nf4", "int8")


@dataclass
class Generating:
    """What both commands share: the model, the adapter, and how answers are generated."""

    model: str = field("smollm2-135m", "base model: 'smollm2-135m', a local directory, or a hub name")
    adapter: str | None = field(None, "adapter directory (slimtune's or PEFT's format); null = the base model")
    template: str = field("chat", "chat | alpaca | gist")
    batch_size: int = field(16, "prompts generated together")
    max_new_tokens: int = field(128, "longest generated response")
    do_sample: bool = field(False, "sample instead of greedy decoding")
    temperature: float = field(0.7, "sampling temperature")
    top_p: float = field(0.9, "nucleus sampling threshold")
    seed: int = field(0, "seed of sampling (and of the judge's pairwise order)")
    quantize: str = field("none", "none | nf4 | int8: a frozen quantised base")
    device: str = field("auto", "auto | cpu | cuda | cuda:N")

    def problems(self, p: Problems) -> None:
        choice(p, "template", self.template, TEMPLATES)
        choice(p, "quantize", self.quantize, QUANTIZE)
        for name in ("batch_size", "max_new_tokens"):
            at_least(p, name, getattr(self, name), 1)
        if not self.temperature > 0:
            p.add(f"temperature={self.temperature}", "must be positive", "give e.g. 0.7")
        if not 0 < self.top_p <= 1:
            p.add(f"top_p={self.top_p}", "a probability mass in (0, 1]", "give e.g. 0.9")


@dataclass
class EvalConfig(Generating):
    """What `slimtune eval` measures and where it writes."""

    data: list[str] = field(["demo"], "rows with responses (.json/.jsonl, any training shape), question files "
                            "with 'turns' (vicuna_bench, mt_bench), or 'demo'")
    references: str | None = field(None, "FastChat reference answers (.jsonl) for question files")
    limit: int = field(0, "evaluate only the first N rows; 0 = all")
    max_len: int = field(512, "longest example for the loss, in tokens")
    out: str = field("eval.jsonl", "per-example results; the summary goes to OUT with .summary.json")
    judge_url: str | None = field(None, "OpenAI-compatible base URL of a judge, e.g. http://127.0.0.1:8080/v1")
    judge_model: str = field("judge", "model name sent to the judge")
    judge_key_env: str = field("SLIMTUNE_JUDGE_KEY", "environment variable holding the judge's API key")
    pairwise_against: str | None = field(None, "another eval's JSONL: judge pairwise win rate against its answers")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        at_least(p, "max_len", self.max_len, 1)
        at_least(p, "limit", self.limit, 0)


@dataclass
class GenerateConfig(Generating):
    """What `slimtune generate` answers, with which model and adapter."""

    prompt: list[str] = field([], "prompts, each answered on its own")
    file: str | None = field(None, "a text file with one prompt per line")
    gist: str | None = field(None, "a gist cache (`slimtune gist compress`): answer each --input after it; needs "
                             "the --adapter it was made with")
    input: list[str] = field([], "with --gist: the inputs, answered in batches after the cached instruction")
    jsonl: bool = field(False, "print one JSON line per prompt")

    def problems(self, p: Problems) -> None:
        super().problems(p)
        if self.gist:
            if not self.input:
                p.add(f"gist={self.gist!r} with no input", "nothing to answer after the cached instruction",
                      "pass --input TEXT (repeatable)")
        elif self.input:
            p.add("--input without --gist", "inputs are answered after a gist cache",
                  "pass --gist FILE, or give the whole prompt with --prompt")
        elif not self.prompt and not self.file:
            p.add("no prompt", "nothing to generate from", "pass --prompt TEXT (repeatable) or --file FILE")
