"""The seed recipe (shared/seeds/000), reproduced in plain PyTorch as the baseline attrclf is measured against.

    python -m benchmarks.seed_baseline --data benchmarks/data/emoji --group-column base_emoji \
        --backbone mobilenetv2_100 --backbone-weights benchmarks/data/mobilenetv2_100.safetensors \
        [--val-list VAL.txt] [--test-list TEST.txt] [--epochs 30] [--out-dir benchmarks/results/seed]

What the seed does, and so what this does: a timm backbone and the head BatchNorm1d - Dropout(0.5) - Linear(128) -
ReLU - Dropout(0.3) - Linear(A); BCE-with-logits with pos_weight = negatives / positives, masked where a label is NA;
Adam on the head at 2e-3, then from epoch 3 the last backbone stage (ResNet's layer4) unfrozen and a new Adam over
everything trainable at 1e-4; batch 16; random crop, flip, colour jitter, perspective and random erasing; images
decoded with PIL every epoch; fp32; `model.train()` for the whole model (frozen BatchNorm statistics drift, as in the
seed); early stopping on validation loss with patience 5, the lowest-loss epoch kept; threshold 0.5.

It imports nothing from attrclf on purpose: no shared fast path can make it faster or better than the seed was. It reads
labels.txt itself; pass --val-list (one image name per line) to validate on the images another run validated on, and
--test-list (image names, labels not needed: they stay with the caller) to write the best epoch's probabilities on
those images to test_predictions.npz, after training, so that no test image informs stopping or the best epoch.
"""

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from timm.models import group_parameters
from torch import nn
from torchvision import transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class SeedConfig:
    data: str
    labels: str | None = None
    images: str | None = None
    group_column: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    backbone: str = "resnet18"
    backbone_weights: str | None = None
    pretrained: bool = False
    image_size: int = 224
    epochs: int = 50
    batch_size: int = 16
    lr_head: float = 2e-3
    lr_finetune: float = 1e-4
    unfreeze_epoch: int = 3
    patience: int = 5
    threshold: float = 0.5
    num_workers: int = 2
    threads: int | None = None
    seed: int = 42
    max_steps: int | None = None  # per epoch: short smoke and speed runs
    out_dir: str | None = None


def read_labels(path: Path, group_column: str | None) -> tuple[list[str], list[tuple[str, list[int]]]]:
    """The seed's reader: header detected when its second token is not 0/1/NA; NA -> -1."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    has_header = lines[0][1] not in ("0", "1", "NA")
    header = lines[0][1:] if has_header else [f"Attr{i + 1}" for i in range(len(lines[0]) - 1)]
    keep = [i for i, name in enumerate(header) if name != group_column]
    rows = [(tokens[0], [-1 if tokens[1 + i] == "NA" else int(tokens[1 + i]) for i in keep])
            for tokens in lines[1 if has_header else 0:]]
    return [header[i] for i in keep], rows


class SeedDataset(torch.utils.data.Dataset):
    def __init__(self, rows, images_dir: Path, transform):
        self.rows, self.images_dir, self.transform = rows, images_dir, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        name, labels = self.rows[index]
        image = Image.open(self.images_dir / name).convert("RGB")
        return self.transform(image), torch.tensor(labels, dtype=torch.float32)


def seed_transforms(size: int):
    train = transforms.Compose([
        transforms.Resize((size * 256 // 224, size * 256 // 224)),
        transforms.RandomCrop(size),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        transforms.RandomPerspective(distortion_scale=0.2, p=0.3),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
        transforms.RandomErasing(p=0.2),
    ])
    val = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    return train, val


class SeedModel(nn.Module):
    def __init__(self, backbone: str, num_labels: int, pretrained: bool = False, weights: str | None = None):
        super().__init__()
        overlay = {"pretrained_cfg_overlay": {"file": weights}} if weights else {}
        self.backbone = timm.create_model(backbone, pretrained=pretrained or bool(weights), num_classes=0, **overlay)
        self.head = nn.Sequential(
            nn.BatchNorm1d(self.backbone.num_features), nn.Dropout(0.5), nn.Linear(self.backbone.num_features, 128),
            nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, num_labels),
        )

    def forward(self, x):
        return self.head(self.backbone(x))

    def freeze_backbone(self, unfreeze_last_stage: bool):
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        last = set(groups[max(groups)])
        for name, param in self.backbone.named_parameters():
            param.requires_grad = unfreeze_last_stage and name in last


def masked_bce(logits, targets, pos_weight):
    mask = (targets >= 0).float()
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets.clamp(min=0), pos_weight=pos_weight,
                                                          reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def masked_map(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """Mean over attributes with both classes among the known labels of sklearn's AP."""
    aps = []
    for a in range(targets.shape[1]):
        known = targets[:, a] >= 0
        if len(set(targets[known, a])) == 2:
            aps.append(average_precision_score(targets[known, a], probs[known, a]))
    return float(np.mean(aps)) if aps else None


def train_epoch(model, loader, optimizer, pos_weight, device, max_steps=None) -> dict:
    model.train()
    total, steps, images, start = 0.0, 0, 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = masked_bce(model(x), y, pos_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, steps, images = total + loss.item(), steps + 1, images + len(x)
        if max_steps and steps >= max_steps:
            break
    return {"train_loss": total / max(steps, 1), "images": images, "train_seconds": time.perf_counter() - start}


@torch.no_grad()
def predict(model, loader, device) -> np.ndarray:
    """(N, A) probabilities, in the loader's order."""
    model.eval()
    return torch.cat([torch.sigmoid(model(x.to(device))).cpu() for x, _ in loader]).numpy()


@torch.no_grad()
def validate(model, loader, pos_weight, device):
    model.eval()
    all_logits, all_targets = [], []
    for x, y in loader:
        all_logits.append(model(x.to(device)).cpu())
        all_targets.append(y)
    logits, targets = torch.cat(all_logits), torch.cat(all_targets)
    return masked_bce(logits, targets, pos_weight.cpu()).item(), torch.sigmoid(logits).numpy(), targets.numpy()


def make_loaders(cfg: SeedConfig):
    labels = Path(cfg.labels) if cfg.labels else Path(cfg.data) / "labels.txt"
    images = Path(cfg.images) if cfg.images else Path(cfg.data) / "images"
    names, rows = read_labels(labels, cfg.group_column)
    if cfg.val_list:
        val_names = set(Path(cfg.val_list).read_text().split())
    else:
        shuffled = [name for name, _ in rows]
        random.Random(cfg.seed).shuffle(shuffled)
        val_names = set(shuffled[: len(rows) // 5])
    train_rows = [r for r in rows if r[0] not in val_names]
    val_rows = [r for r in rows if r[0] in val_names]
    train_tf, val_tf = seed_transforms(cfg.image_size)
    kwargs = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers}
    train_loader = torch.utils.data.DataLoader(SeedDataset(train_rows, images, train_tf), shuffle=True, **kwargs)
    val_loader = torch.utils.data.DataLoader(SeedDataset(val_rows, images, val_tf), shuffle=False, **kwargs)
    y = np.array([r[1] for r in train_rows])
    pos, neg = (y == 1).sum(0), (y == 0).sum(0)
    pos_weight = torch.tensor(neg / np.maximum(pos, 1), dtype=torch.float32)
    test_loader = None
    if cfg.test_list:
        test_rows = [(name, [0] * len(names)) for name in Path(cfg.test_list).read_text().split()]
        test_loader = torch.utils.data.DataLoader(SeedDataset(test_rows, images, val_tf), shuffle=False, **kwargs)
    return names, train_loader, val_loader, test_loader, pos_weight


def run(cfg: SeedConfig) -> dict:
    """Train with the seed recipe; returns the history and the best epoch's validation probabilities."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names, train_loader, val_loader, test_loader, pos_weight = make_loaders(cfg)
    model = SeedModel(cfg.backbone, len(names), cfg.pretrained, cfg.backbone_weights).to(device)
    pos_weight = pos_weight.to(device)
    model.freeze_backbone(unfreeze_last_stage=False)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=cfg.lr_head)
    history, best, since_best, start = [], None, 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        if epoch == cfg.unfreeze_epoch:
            model.freeze_backbone(unfreeze_last_stage=True)
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr_finetune)
        row = train_epoch(model, train_loader, optimizer, pos_weight, device, cfg.max_steps)
        val_start = time.perf_counter()
        val_loss, probs, targets = validate(model, val_loader, pos_weight, device)
        row.update(epoch=epoch + 1, stage="head" if epoch < cfg.unfreeze_epoch else "finetune", val_loss=val_loss,
                   val_mAP=masked_map(probs, targets), val_seconds=time.perf_counter() - val_start,
                   elapsed=time.perf_counter() - start)
        history.append(row)
        print(f"seed epoch {epoch + 1} [{row['stage']}] train_loss {row['train_loss']:.4f} val_loss {val_loss:.4f} "
              f"val_mAP {row['val_mAP'] or 0:.4f} ({row['train_seconds']:.0f}s + {row['val_seconds']:.0f}s)")
        if best is None or val_loss < best["val_loss"]:
            best, since_best = {"epoch": epoch + 1, "val_loss": val_loss, "probs": probs, "targets": targets}, 0
            if test_loader is not None:  # a copy of the best weights, scored on the test images after training
                best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    if test_loader is not None:
        model.load_state_dict(best.pop("state"))
        best["test_names"] = [name for name, _ in test_loader.dataset.rows]
        best["test_probs"] = predict(model, test_loader, device)
    return {"label_names": names, "history": history, "best": best, "config": asdict(cfg)}


def save(result: dict, out_dir: Path) -> None:
    """result.json (history, best epoch), val_predictions.npz (probs; targets with NA as -1) and, with --test-list,
    test_predictions.npz (probs and image names)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    best = result["best"]
    summary = {k: v for k, v in result.items() if k != "best"}
    summary["best_epoch"], summary["best_val_loss"] = best["epoch"], best["val_loss"]
    partial = out_dir / ".result.json.partial"
    partial.write_text(json.dumps(summary, indent=2))
    os.replace(partial, out_dir / "result.json")
    partial = out_dir / ".val_predictions.npz.partial"
    with open(partial, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, probs=best["probs"], targets=best["targets"])
    os.replace(partial, out_dir / "val_predictions.npz")
    if "test_probs" in best:
        partial = out_dir / ".test_predictions.npz.partial"
        with open(partial, "wb") as f:
            np.savez(f, probs=best["test_probs"], names=np.array(best["test_names"]))
        os.replace(partial, out_dir / "test_predictions.npz")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(SeedConfig(data="")).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = type(default) if default is not None else (int if name in ("threads", "max_steps") else str)
            parser.add_argument(flag, type=kind, default=default, required=name == "data")
    cfg = SeedConfig(**vars(parser.parse_args(argv)))
    result = run(cfg)
    if cfg.out_dir:
        save(result, Path(cfg.out_dir))
    print(f"best epoch {result['best']['epoch']} (val loss {result['best']['val_loss']:.4f}), "
          f"val mAP {masked_map(result['best']['probs'], result['best']['targets'])}")


if __name__ == "__main__":
    main()
