"""Where the tokens after the gists look: per layer, the share of their attention that goes to
the gist tokens, to the input and the rest of the prompt after the gists, and to the
instruction (zero under the gist mask: a check, not a finding), for one trained gist model.

    python bench/gist_attention.py --adapter runs/gist_tasks/gist-k1/adapter \
        --data runs/gist_tasks/data/seen.jsonl --out docs/img/gist_attention.png

Every prompt is the gist template's full prompt under the gist mask (as in training), run with
eager attention so that the weights can be read; a query's attention is split by where its
keys sit and averaged over the heads, the post-gist positions and the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import slimtune
from slimtune.data.batches import collate
from slimtune.data.gist import GistMask
from slimtune.data.templates import gist_prompt
from slimtune.models.attention import model_mask

PARTS = ("instruction", "gists", "after the gists")


@torch.no_grad()
def attention_shares(model, tok, rows: list[dict]) -> torch.Tensor:
    """(layers, 3): the mean share of the post-gist queries' attention on each part."""
    spec = slimtune.gist_tokens(model)
    totals = None
    for row in rows:
        before, after = gist_prompt(row["instruction"], row.get("input", ""), spec.num)
        head = tok(before)["input_ids"]
        ids = head + tok(after, add_special_tokens=False)["input_ids"]
        b = collate([ids], [ids], 0, gist=GistMask(spec.token_id, "gist"))
        out = model(input_ids=b["input_ids"], attention_mask=model_mask(b["attention_mask"], model, torch.float32),
                    position_ids=b["position_ids"], output_attentions=True)
        g0, g1 = len(head) - spec.num, len(head)  # the gists' positions
        shares = []
        for att in out.attentions:  # (1, heads, T, T)
            q = att[0, :, g1:, :].mean(0)  # (T_after, T): averaged over heads
            shares.append(torch.stack([q[:, :g0].sum(-1).mean(), q[:, g0:g1].sum(-1).mean(), q[:, g1:].sum(-1).mean()]))
        shares = torch.stack(shares)  # (layers, 3)
        totals = shares if totals is None else totals + shares
    return totals / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True, help="Alpaca rows (.jsonl)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--out", default="gist_attention.png")
    args = ap.parse_args()
    model = slimtune.load_model(args.model).eval()
    model.config._attn_implementation = "eager"  # attention weights are only returned by the eager path
    tok = slimtune.load_tokenizer(args.model)
    slimtune.load_adapter(model, args.adapter, tokenizer=tok)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.rows]]
    shares = attention_shares(model, tok, rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 0.22 * shares.shape[0] + 1.4))
    im = ax.imshow(shares.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(PARTS)), PARTS)
    ax.set_ylabel("layer")
    ax.set_title(f"attention of the tokens after {slimtune.gist_tokens(model).num} gist(s)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08, label="share of attention")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    summary = {"rows": len(rows), "per_layer": {str(i): dict(zip(PARTS, map(float, s))) for i, s in enumerate(shares)}}
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({p: float(shares[:, i].mean()) for i, p in enumerate(PARTS)}))


if __name__ == "__main__":
    main()
