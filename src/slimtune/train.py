"""The one training loop, shared by `slimtune train`, the tests and bench/train.py.

    run = setup(cfg)                 # model + adapter (+ quantised base), data, optimiser
    stats = train_step(run, step)    # StepStats: loss, labelled and processed tokens, grad norm
    job.run_training(cfg)            # the whole job: resume, log, checkpoint, evaluate

One optimiser step consumes a global window of batch_size x grad_accum x world examples.
The loss is summed over the window's labelled tokens and divided by their number (across
micro-batches and ranks), so 1x8, 4x2 and 8x1 give the same gradient. Under torchrun the
same command runs DistributedDataParallel or FSDP2 (parallel.py); rank 0 alone logs and
writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from . import data as D
from . import prepare as P
from .config import TrainConfig, from_dict
from .errors import Problems
from .evaluate import CausalLMLoss
from .ops import set_trainable
from .alloc import keep_freed_memory
from .parallel import init_distributed, wrap
from .quantize import MODES as QUANT_MODES

DEFAULT_LR = {"matrix": 1e-3, "vector": 1e-2}  # adapter matrices (A, B); vectors (VeRA d/b, Tied-LoRA u/v, (IA)3 l)


class Interrupted(Exception):
    """Ctrl-C during training; a checkpoint was written first."""


@dataclass
class Run:
    cfg: TrainConfig
    model: nn.Module
    tokenizer: object
    loss_model: nn.Module  # DDP-wrapped under torchrun
    opt: torch.optim.Optimizer
    train: P.Prepared
    val: P.Prepared
    val_examples: list
    device: torch.device
    rank: int = 0
    world: int = 1
    bf16: bool = False
    params: list = dataclasses.field(default_factory=list)
    fsdp: bool = False

    @property
    def evaluates(self) -> bool:
        """Whether this rank evaluates and gathers checkpoints: rank 0, or every rank under FSDP2."""
        return self.rank == 0 or self.fsdp

    @property
    def window(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train.input_ids) // self.window

    @property
    def total_steps(self) -> int:
        return self.cfg.steps or max(1, math.ceil(self.cfg.epochs * self.steps_per_epoch))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


def load_examples(cfg: TrainConfig) -> tuple[list, list]:
    """(train, validation) examples from cfg.data / cfg.val_data, or the demo data."""
    from .demo import demo_split

    if cfg.data == ["demo"]:
        train_rows, eval_rows = demo_split(cfg.demo_rows, max(cfg.eval_generate, 50))
        return [D.to_example(r, f"demo[{i}]") for i, r in enumerate(train_rows)], \
               [D.to_example(r, f"demo-eval[{i}]") for i, r in enumerate(eval_rows)]
    examples, skipped = D.load_rows(cfg.data, cfg.on_bad_rows)
    if skipped:
        print(f"slimtune: skipped {len(skipped)} bad row(s), e.g. {skipped[0]}")
    if cfg.val_data:
        return examples, D.load_rows(cfg.val_data, cfg.on_bad_rows)[0]
    return P.split(examples, cfg.val_fraction, cfg.seed)


def _prepare(examples, tokenizer, cfg: TrainConfig) -> P.Prepared:
    prep = P.tokenize(examples, tokenizer, cfg.template, cfg.max_len, cfg.truncation)
    return P.pack(prep, cfg.max_len) if cfg.packing else prep


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list]:
    """AdamW with one group for adapter matrices and one for vectors (their own LR, no decay)."""
    params = set_trainable(model)
    mats, vecs = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    groups = [g for g in ({"params": mats, "lr": cfg.lr or DEFAULT_LR["matrix"], "weight_decay": cfg.weight_decay},
                          {"params": vecs, "lr": cfg.lr_vectors or DEFAULT_LR["vector"], "weight_decay": 0.0})
              if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=fusable_adamw(params)), params


def fusable_adamw(params: list) -> bool:
    """Whether AdamW's fused kernel (one pass per step instead of a chain of foreach ops, ~3x
    faster on the adapters' many small tensors) serves these parameters: plain float tensors on
    CPU or CUDA. FSDP2's sharded DTensors keep the foreach path."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        DTensor = ()
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                                and not isinstance(p.data, DTensor) for p in params)


def lr_factor(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up, then constant or cosine decay to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def setup(cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None,
          examples: tuple[list, list] | None = None) -> Run:
    """Model with its adapter, tokenized data, optimiser: everything a step needs."""
    import slimtune
    from .quantize import quantize_model

    _validate(cfg)
    rank, world, device = init_distributed(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                        and torch.cuda.is_bf16_supported())
    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()
    if model is None:
        model = slimtune.load_model(cfg.model, dtype=torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32)
        tokenizer = tokenizer or slimtune.load_tokenizer(cfg.model)
    model.to(device)
    quantize_model(model, cfg.quantize)
    if cfg.init_adapter:
        slimtune.load_adapter(model, cfg.init_adapter)
    else:
        slimtune.add_adapter(model, adapter_config_for(cfg))
    for p in set_trainable(model):  # adapters train in fp32 whatever the base dtype
        p.data = p.data.float()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    train_ex, val_ex = examples or load_examples(cfg)
    loss_model = CausalLMLoss(model)
    if world > 1:
        loss_model = wrap(loss_model, model, cfg.parallel, device)
    opt, params = build_optimizer(model, cfg)  # after sharding: FSDP2 replaces the parameters
    run = Run(cfg, model, tokenizer, loss_model, opt, _prepare(train_ex, tokenizer, cfg), _prepare(val_ex, tokenizer, cfg),
              val_ex, device, rank, world, bf16, params, fsdp=world > 1 and cfg.parallel == "fsdp")
    if run.steps_per_epoch == 0:
        p = Problems("not enough data")
        p.add(f"{len(run.train.input_ids)} training rows", f"fewer than one step's window of {run.window} "
              f"(batch_size x grad_accum x processes)", "add rows or lower --batch_size / --grad_accum")
        p.raise_if_any()
    return run


def micro_batches(run: Run, step: int) -> list[dict]:
    """This rank's micro-batches of optimiser step `step` (deterministic in seed and step)."""
    cfg, B = run.cfg, run.cfg.batch_size
    epoch, pos = divmod(step, run.steps_per_epoch)
    order = P.epoch_order(len(run.train.input_ids), cfg.seed, epoch)
    window = order[pos * run.window:(pos + 1) * run.window]
    pad = P.pad_id(run.tokenizer)
    out = []
    for m in range(cfg.grad_accum):
        idx = window[(m * run.world + run.rank) * B:(m * run.world + run.rank + 1) * B]
        b = P.collate([run.train.input_ids[i] for i in idx], [run.train.labels[i] for i in idx], pad)
        out.append({k: v.to(run.device) for k, v in b.items()})
    return out


def _all_sum(x: torch.Tensor, run: Run) -> torch.Tensor:
    if run.world > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


@dataclass
class StepStats:
    loss: float  # mean loss per labelled token of the whole window (all ranks)
    labelled: int  # tokens that carry loss in the window
    tokens: int  # tokens processed in the window (padding excluded)
    grad_norm: float


def train_step(run: Run, step: int, batches: list[dict] | None = None) -> StepStats:
    """One optimiser step over the window of step `step`."""
    batches = batches or micro_batches(run, step)
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != D.IGNORE).sum()) for b in batches),
                           sum(int(b["attention_mask"].sum()) for b in batches)], dtype=torch.float32)
    n_tok, n_in = _all_sum(counts.to(run.device), run)  # labelled and processed tokens, all ranks
    loss_sum = torch.zeros((), device=run.device)
    for g in run.opt.param_groups:
        g["lr"] = g["base_lr"] * lr_factor(step, run.cfg, run.total_steps)
    for k, b in enumerate(batches):
        sync = run.world == 1 or k == len(batches) - 1
        if run.fsdp:  # reduce-scatter the gradients once per window
            run.loss_model.set_requires_gradient_sync(sync)
        with (contextlib.nullcontext() if sync or run.fsdp else run.loss_model.no_sync()), run.autocast():
            s, _ = run.loss_model(**b)
            (s * run.world / n_tok).backward()  # DDP averages over ranks; the window's token mean results
        loss_sum += s.detach().float()
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm) if run.cfg.max_grad_norm else \
        torch.zeros(())
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return StepStats((_all_sum(loss_sum, run) / n_tok).item(), int(n_tok), int(n_in), float(norm))


def _validate(cfg: TrainConfig, p: Problems | None = None) -> None:
    own = p is None
    p = p or Problems("invalid training config")
    for name, allowed in (("schedule", ("constant", "cosine")), ("precision", ("fp32", "bf16", "auto")),
                          ("template", D.TEMPLATES), ("truncation", ("prompt", "error")),
                          ("on_bad_rows", ("error", "skip")), ("quantize", QUANT_MODES),
                          ("parallel", ("ddp", "fsdp"))):
        if getattr(cfg, name) not in allowed:
            p.add(f"{name}={getattr(cfg, name)!r}", "not an allowed value", f"use one of {list(allowed)}")
    for name in ("batch_size", "grad_accum", "max_len"):
        if getattr(cfg, name) < 1:
            p.add(f"{name}={getattr(cfg, name)!r}", "must be at least 1", f"set {name} >= 1")
    if cfg.steps < 0 or cfg.epochs <= 0:
        p.add(f"steps={cfg.steps}, epochs={cfg.epochs}", "nothing to train", "give steps > 0 or epochs > 0")
    for name in ("lr", "lr_vectors"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
            p.add(f"{name}={getattr(cfg, name)!r}", "a learning rate must be positive", "give a value > 0 or null")
    if own:
        p.raise_if_any()


def adapter_config_for(cfg: TrainConfig):
    """The preset named by cfg.method with cfg.adapter's overrides (nested keys merge)."""
    from .presets import preset_config

    return preset_config(cfg.method, cfg.adapter)


def train_config(data: dict) -> TrainConfig:
    """A TrainConfig from plain data (a YAML file, flags). Unknown keys, bad values and a bad
    adapter section are reported together."""
    from .errors import SlimtuneError

    p = Problems("invalid training config")
    cfg = from_dict(TrainConfig, data, p)
    _validate(cfg, p)
    try:
        adapter_config_for(cfg)
    except SlimtuneError as e:
        p.items += [dataclasses.replace(x, what=f"adapter: {x.what}") for x in e.problems]
    p.raise_if_any()
    return cfg
