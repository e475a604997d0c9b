"""The one training loop, shared by `slimtune train`, the tests and bench/train.py.

    run = setup(cfg)                 # model + adapter (+ quantised base), data, optimiser
    stats = train_step(run, step)    # StepStats: loss, auxiliary losses, tokens, grad norm
    recipes.train.run_training(cfg)  # the whole job: resume, log, checkpoint, evaluate

One optimiser step consumes a global window of batch_size x grad_accum x world examples.
The LM loss is summed over the window's labelled tokens and divided by their number (across
micro-batches and ranks); an auxiliary loss a site reports (adapters/protocol.py, AuxLoss) is
summed over the window's real tokens and divided by theirs, times its weight. So 1x8, 4x2 and
8x1 give the same loss and gradient. A loss or gradient that is not finite stops the run
before the optimiser step, with the step named. Under torchrun the same command runs DDP or
FSDP2 (parallel.py); rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.gist import add_gist_tokens, gist_tokens
from ..adapters.helpers import collect_aux_losses, param_groups, set_trainable
from ..adapters.inject import add_adapter
from ..data import batches as Bt
from ..data.demo import demo_split
from ..data.rows import IGNORE, load_rows, to_example
from ..errors import Problem, Problems, SlimtuneError
from ..formats.adapter import load_adapter
from ..models.attention import check_4d_support, real_tokens
from ..models.gist import GistTokens, add_gist_token, give_gist_rows
from ..models.load import load_model, load_tokenizer
from ..models.quantize import quantize_model
from .config import TrainConfig
from .loss import CausalLMLoss
from .memory import keep_freed_memory
from .parallel import init_distributed, wrap

# learning rate per optimiser group, where the config leaves it null; routers follow the matrices
DEFAULT_LR = {"matrix": 1e-3, "vector": 1e-2, "embedding": 1e-3}


class Interrupted(Exception):
    """Ctrl-C during training; a checkpoint was written first."""


class NonFinite(SlimtuneError):
    """The loss or the gradient stopped being finite: training stops before the bad update."""


@dataclass
class Run:
    cfg: TrainConfig
    model: nn.Module
    tokenizer: object
    loss_model: nn.Module  # DDP-wrapped under torchrun
    opt: torch.optim.Optimizer
    train: Bt.Prepared
    val: Bt.Prepared
    val_examples: list
    device: torch.device
    rank: int = 0
    world: int = 1
    bf16: bool = False
    params: list = field(default_factory=list)
    fsdp: bool = False
    skipped: list = field(default_factory=list)  # bad rows skipped under on_bad_rows=skip

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


def load_examples(cfg: TrainConfig) -> tuple[list, list, list]:
    """(train, validation, skipped bad rows) from cfg.data / cfg.val_data, or the demo data."""
    if cfg.data == ["demo"]:
        train_rows, eval_rows = demo_split(cfg.demo_rows, max(cfg.eval_generate, 50))
        return [to_example(r, f"demo[{i}]") for i, r in enumerate(train_rows)], \
               [to_example(r, f"demo-eval[{i}]") for i, r in enumerate(eval_rows)], []
    examples, skipped = load_rows(cfg.data, cfg.on_bad_rows)
    if cfg.val_data:
        val, more = load_rows(cfg.val_data, cfg.on_bad_rows)
        return examples, val, skipped + more
    train, val = Bt.split(examples, cfg.val_fraction, cfg.seed)
    return train, val, skipped


def _prepare(examples, tokenizer, cfg: TrainConfig, gist: GistTokens | None = None) -> Bt.Prepared:
    prep = Bt.tokenize(examples, tokenizer, cfg.template, cfg.max_len, cfg.truncation, gist)
    return Bt.pack(prep, cfg.max_len) if cfg.packing else prep


def build_optimizer(model: nn.Module, cfg: TrainConfig, name: str | None = None) -> tuple[torch.optim.Optimizer, list]:
    """AdamW over adapter `name` (the active one), with one group per declared optimiser group
    (matrix, vector, router, embedding), each with its own learning rate and weight decay.
    Only that adapter's tensors are left trainable."""
    set_trainable(model, name)
    lr = {"matrix": cfg.lr or DEFAULT_LR["matrix"], "vector": cfg.lr_vectors or DEFAULT_LR["vector"],
          "router": cfg.lr_router or cfg.lr or DEFAULT_LR["matrix"],
          "embedding": cfg.lr_embedding or DEFAULT_LR["embedding"]}
    decay = {"matrix": cfg.weight_decay, "vector": cfg.weight_decay_vectors, "router": cfg.weight_decay_router,
             "embedding": cfg.weight_decay_embedding}
    groups = [{"params": ps, "lr": lr[g], "weight_decay": decay[g], "base_lr": lr[g], "group": g}
              for g, ps in param_groups(model, name).items() if ps]
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=fusable_adamw(params)), params


def fusable_adamw(params: list) -> bool:
    """Whether AdamW's fused kernel (one pass per step instead of a chain of foreach ops) serves
    these parameters: plain float tensors on CPU or CUDA. FSDP2's sharded DTensors keep the
    foreach path."""
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
    rank, world, device = init_distributed(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                        and torch.cuda.is_bf16_supported())
    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()
    train_ex, val_ex, skipped = (*examples, []) if examples else load_examples(cfg)
    if model is None:
        model = load_model(cfg.model, dtype=torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32)
        tokenizer = tokenizer or load_tokenizer(cfg.model)
    if cfg.packing or cfg.gist:
        check_4d_support(model)
    model.to(device)
    gist = GistTokens(add_gist_token(tokenizer), cfg.gist, cfg.gist_condition) if cfg.gist else None
    if gist is not None:
        give_gist_rows(model, gist.token_id)  # the base's frozen row, before quantising
    quantize_model(model, cfg.quantize)
    if cfg.init_adapter:
        load_adapter(model, cfg.init_adapter, tokenizer=tokenizer)
    else:
        add_adapter(model, cfg.adapter)
    if gist is not None:
        if gist_tokens(model) is not None and gist_tokens(model) != gist:
            p = Problems("cannot continue from init_adapter")
            p.add(f"init_adapter={cfg.init_adapter!r}", f"its gist settings {gist_tokens(model)} differ from "
                  f"gist={cfg.gist}, gist_condition={cfg.gist_condition!r}", "train with the adapter's settings")
            p.raise_if_any()
        if gist_tokens(model) is None:
            add_gist_tokens(model, gist)
    gist = gist_tokens(model)
    for p in set_trainable(model):  # adapters train in fp32 whatever the base dtype
        p.data = p.data.float()
    if cfg.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_model = CausalLMLoss(model)
    if world > 1:
        loss_model = wrap(loss_model, model, cfg.parallel, device)
    opt, params = build_optimizer(model, cfg)  # after sharding: FSDP2 replaces the parameters
    run = Run(cfg, model, tokenizer, loss_model, opt, _prepare(train_ex, tokenizer, cfg, gist),
              _prepare(val_ex, tokenizer, cfg, gist), val_ex, device, rank, world, bf16, params,
              fsdp=world > 1 and cfg.parallel == "fsdp", skipped=skipped)
    p = Problems("nothing to train on")
    if run.steps_per_epoch == 0:
        p.add(f"{len(run.train.input_ids)} training rows", f"fewer than one step's window of {run.window} "
              f"(batch_size x grad_accum x processes)", "add rows or lower --batch_size / --grad_accum")
    elif run.train.labelled() == 0:
        p.add(f"max_len={cfg.max_len}", f"no response token is left in any of the {len(run.train.input_ids)} "
              "training rows after truncation, so no token carries loss", "raise --max_len")
    p.raise_if_any()
    return run


def micro_indices(run: Run, step: int) -> list[list[int]]:
    """The training rows of this rank's micro-batches of optimiser step `step` (deterministic in
    seed and step)."""
    cfg, B = run.cfg, run.cfg.batch_size
    epoch, pos = divmod(step, run.steps_per_epoch)
    order = Bt.epoch_order(len(run.train.input_ids), cfg.seed, epoch)
    window = order[pos * run.window:(pos + 1) * run.window]
    return [window[(m * run.world + run.rank) * B:(m * run.world + run.rank + 1) * B] for m in range(cfg.grad_accum)]


def micro_batches(run: Run, step: int) -> list[dict]:
    """This rank's micro-batches of optimiser step `step`, collated, on the device."""
    pad = Bt.pad_id(run.tokenizer)
    return [{k: v.to(run.device) for k, v in Bt.collate(**run.train.rows(idx), pad_id=pad).items()}
            for idx in micro_indices(run, step)]


def _all_sum(x: torch.Tensor, run: Run) -> torch.Tensor:
    if run.world > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


@dataclass
class StepStats:
    loss: float  # mean LM loss per labelled token of the whole window (all ranks)
    labelled: int  # tokens that carry loss in the window
    tokens: int  # tokens processed in the window (padding excluded)
    grad_norm: float
    aux: dict = field(default_factory=dict)  # auxiliary losses per real token, unweighted, by name

    @property
    def total(self) -> float:
        """What the optimiser minimised: the LM loss plus the weighted auxiliary losses."""
        return self.loss + sum(w * v for v, w in self.aux.values())


def train_step(run: Run, step: int, batches: list[dict] | None = None) -> StepStats:
    """One optimiser step over the window of step `step`."""
    batches = batches or micro_batches(run, step)
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches),
                           sum(int(real_tokens(b["attention_mask"]).sum()) for b in batches)], dtype=torch.float32)
    n_tok, n_in = _all_sum(counts.to(run.device), run).clamp(min=1)  # labelled and processed tokens, all ranks
    loss_sum = torch.zeros((), device=run.device)
    aux: dict[str, list] = {}  # name -> [summed total, weight]
    for g in run.opt.param_groups:
        g["lr"] = g["base_lr"] * lr_factor(step, run.cfg, run.total_steps)
    for k, b in enumerate(batches):
        sync = run.world == 1 or k == len(batches) - 1
        if run.fsdp:  # reduce-scatter the gradients once per window
            run.loss_model.set_requires_gradient_sync(sync)
        with (contextlib.nullcontext() if sync or run.fsdp else run.loss_model.no_sync()), run.autocast(), \
                collect_aux_losses(run.model, real_tokens(b["attention_mask"])) as reported:
            s, _ = run.loss_model(**b)
        total = s / n_tok
        for a in reported:
            total = total + a.weight * a.total.float() / n_in
            entry = aux.setdefault(a.name, [torch.zeros((), device=run.device), a.weight])
            entry[0] = entry[0] + a.total.detach().float()
        (total * run.world).backward()  # DDP averages over ranks; the window's token means result
        loss_sum += s.detach().float()
    clip = run.cfg.max_grad_norm or float("inf")  # inf: the norm, for the finiteness check, without clipping
    norm = torch.nn.utils.clip_grad_norm_(run.params, clip)
    loss = _all_sum(loss_sum, run) / n_tok
    aux_means = {name: (float(_all_sum(v, run) / n_in), w) for name, (v, w) in aux.items()}
    if not (torch.isfinite(loss) and torch.isfinite(norm) and all(math.isfinite(v) for v, _ in aux_means.values())):
        run.opt.zero_grad(set_to_none=True)
        what = f"loss {float(loss):.4g}" if not torch.isfinite(loss) else f"gradient norm {float(norm):.4g}"
        raise NonFinite(_non_finite_problem(step + 1, what, run.cfg))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return StepStats(float(loss), int(n_tok), int(n_in), float(norm), aux_means)


def _non_finite_problem(step: int, what: str, cfg: TrainConfig) -> Problem:
    lr = cfg.lr or DEFAULT_LR["matrix"]
    return Problem(f"step {step}: {what}", "training diverged: the loss or gradient is no longer a finite number, "
                   "so this update was not applied", f"lower the learning rate (--lr {lr:g} now) and train again; "
                   "the checkpoints written before this step are intact")
