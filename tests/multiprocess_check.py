"""Checks that need several processes; test_scale.py runs this under `accelerate launch --num_processes 2`.

1. Evaluation of a fixed saved model: the gathered validation set, in dataset order, each image once.
2. Two-stage training through `fit`: after the stage switch the unfrozen backbone must stay identical on every process
   (gradients synchronised), and it must have trained.
The main process writes the results to a JSON file.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from attrclf import AttrClassifier
from attrclf.config import TrainConfig
from attrclf.engine import build_model, evaluate, fit
from attrclf.loader import make_loader
from attrclf.losses import build_loss
from attrclf.metrics import evaluate_predictions
from attrclf.sources import prepare_data
from attrclf.transforms import eval_transform


def evaluate_saved_model(model_dir: str, data, accelerator: Accelerator, batch_size: int,
                         pos_weight: list[float] | None = None) -> dict:
    model = AttrClassifier.from_pretrained(model_dir)
    loader = make_loader(data.validation, eval_transform(model.config), batch_size, shuffle=False)
    pos_weight = torch.tensor(pos_weight) if pos_weight else torch.ones(len(data.label_names))
    loss_fn = build_loss("bce", pos_weight).to(accelerator.device)
    model, loader = accelerator.prepare(model, loader)
    result = evaluate(model, loader, loss_fn, accelerator)
    accelerator.free_memory()
    metrics = evaluate_predictions(result.probs, result.targets, result.mask, data.label_names,
                                   [0.5] * len(data.label_names))
    return {"loss": result.loss, "mAP": metrics["mAP"], "f1_macro_at_0.5": metrics["f1_macro_at_0.5"],
            "probs": result.probs.tolist(), "targets": result.targets.tolist(), "mask": result.mask.tolist()}


def train_two_stages(data, accelerator: Accelerator, output_dir: str) -> dict:
    cfg = TrainConfig(data="unused", backbone="test_resnet", pretrained=False, image_size=32, batch_size=8, epochs=2,
                      head_epochs=1, unfreeze_stages="all", num_workers=0, keep_checkpoints=0,
                      output_dir=output_dir).resolve()
    set_seed(cfg.seed)
    model = build_model(cfg, data.label_names)
    initial = torch.cat([p.detach().flatten().clone() for p in model.backbone.parameters()])
    result = fit(model, data, cfg, accelerator)
    backbone = torch.cat([p.detach().flatten() for p in model.backbone.parameters()])
    every_rank = accelerator.gather(backbone[None])  # (processes, P)
    return {"steps": len(result.history.iterations.step),
            "backbone_max_difference_between_processes": float((every_rank - every_rank[0]).abs().max()),
            "backbone_max_change": float((backbone - initial).abs().max())}


def main(model_dir: str, data_dir: str, output_dir: str) -> None:
    accelerator = Accelerator()
    data = prepare_data(data_dir, group_column="grp", val_fraction=0.25, seed=42)
    report = {"world_size": accelerator.num_processes, "validation_images": len(data.validation),
              "evaluation": evaluate_saved_model(model_dir, data, accelerator, batch_size=4),
              "training": train_two_stages(data, accelerator, output_dir)}
    if accelerator.is_main_process:
        (Path(output_dir) / "report.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
