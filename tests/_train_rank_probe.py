"""Run by `accelerate launch` in tests/test_training_distributed.py: trains, then writes what this rank saw."""

import json
import os
import sys

import torch

from balcony.modeling.model import BalconyModel
from balcony.training import TrainConfig, train
from balcony.training.objective import DistillObjective
from balcony.training.packing import PackedData

seen = {"forwards": 0, "generate": 0, "saves": 0}
_init, _forward, _generate, _save = DistillObjective.__init__, DistillObjective.forward, BalconyModel.generate, PackedData.save


def init(self, model, cfg, *a, **k):
    _init(self, model, cfg, *a, **k)
    seen["model"] = model


def forward(self, *a, **k):
    seen["forwards"] += 1
    return _forward(self, *a, **k)


def generate(self, *a, **k):
    seen["generate"] += 1
    return _generate(self, *a, **k)


def save(self, path):
    seen["saves"] += 1
    return _save(self, path)


DistillObjective.__init__, DistillObjective.forward, BalconyModel.generate, PackedData.save = init, forward, generate, save
result = train(TrainConfig(**json.loads(sys.argv[1])))
rank = int(os.environ.get("RANK", "0"))
model = seen["model"]
# FSDP shards are DTensors: gather each (every rank takes part) to compare the ranks' full exits.
exits = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in model.exit_state_dict().items()}
local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.exits.parameters())  # what this rank holds
torch.save({"exits": exits, "local_exit_numel": local,
            "forwards": seen["forwards"], "generate": seen["generate"], "saves": seen["saves"], "steps": result.steps},
           os.path.join(sys.argv[2], f"rank{rank}.pt"))
