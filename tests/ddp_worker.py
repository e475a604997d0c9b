"""Run under torchrun by test_ddp.py: train through run_training, then write this rank's weights and losses."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

import slimtune

cfg = slimtune.TrainConfig(**json.loads(sys.argv[1]))
model, tok = slimtune.load_model(cfg.model), slimtune.load_tokenizer(cfg.model)
summary = slimtune.run_training(cfg, model=model, tokenizer=tok)
rank = int(os.environ["RANK"])
from slimtune.formats.sharding import full_tensors

weights = {k: v.contiguous() for k, v in full_tensors(slimtune.trainable_parameters(model)).items()}
save_file(weights, os.path.join(sys.argv[2], f"rank{rank}.safetensors"))
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump({"losses": summary["losses"], "world": torch.distributed.get_world_size(),
               "threads": torch.get_num_threads()}, f)

from slimtune.train.parallel import shutdown  # noqa: E402

shutdown()
