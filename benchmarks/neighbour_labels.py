"""How well can an image's nearest neighbours fill in its NA labels? A study for issue 11's "use the NA entries".

For bench_quality's split of `--dataset` (same test split, validation and hidden labels per seed), the frozen
ImageNet MobileNetV2 embeds every training image (whole image resized to `--image-size`, no crop); each NA entry of
attribute a looks at the `--k` most similar training images (cosine) whose a is known. A vote that is unanimous
becomes a label only where the known labels say unanimity can be trusted for that attribute: among the known entries
(each with its neighbours found without itself: leave one out), the unanimous-positive votes must be right at least
`--precision` of the time, and the unanimous-negative votes must hold positives at most 1/`--purity` as often as the
attribute's prior (its positive share). Nothing here reads a hidden label to decide; the hidden labels only score
the fills afterwards.

    python -m benchmarks.neighbour_labels --dataset tabler [--label-set hidden] [--seed 0] [--write-labels FILE]

Prints per attribute: the prior, the leave-one-out precision of unanimous positives and positive share of unanimous
negatives, how many NA entries each side fills and how many of those the hidden labels confirm; writes
benchmarks/results/neighbour_labels_DATASET_LABELSET_sSEED.json. `--write-labels` writes the labels file with the
fills as known labels (bench_quality's hidden file plus the fills: `--variant "fill=--labels FILE"` trains on it).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from . import bench_quality
from .common import DATASETS, WEIGHTS, LabelTable, table, write_result

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def as_matrix(labels: LabelTable) -> np.ndarray:
    """(N, A) float: 1, 0, NaN for NA."""
    targets = labels.targets().astype(np.float64)
    return np.where(targets < 0, np.nan, targets)


@torch.no_grad()
def embeddings(names: list[str], images_dir, image_size: int) -> np.ndarray:
    """(N, 1280) L2-normalised pooled MobileNetV2 features of the whole images."""
    model = timm.create_model("mobilenetv2_100", num_classes=0)
    model.load_state_dict(load_file(str(WEIGHTS)), strict=False)
    model.eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(names), 256):
        size = (image_size, image_size)
        pixels = [np.array(Image.open(images_dir / n).convert("RGB").resize(size, Image.BICUBIC))
                  for n in names[start:start + 256]]
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
        out.append(model((batch - mean) / std))
    features = torch.cat(out).numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def neighbour_fills(features: np.ndarray, labels: np.ndarray, k: int, precision: float, purity: float):
    """Per attribute: (positives, negatives) bool (N,) of NA entries to fill, and the leave-one-out figures."""
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)  # never one's own neighbour
    fills, figures = [], []
    for a in range(labels.shape[1]):
        column = labels[:, a]
        known = ~np.isnan(column)
        nearest = np.argsort(-similarity[:, known], axis=1)[:, :k]
        votes = column[known][nearest]
        unanimous_pos, unanimous_neg = votes.min(1) == 1, votes.max(1) == 0
        prior = float(column[known].mean()) if known.any() else 0.0
        pos_checked, neg_checked = known & unanimous_pos, known & unanimous_neg
        pos_precision = float(column[pos_checked].mean()) if pos_checked.sum() >= 5 else 0.0
        neg_share = float(column[neg_checked].mean()) if neg_checked.sum() >= 20 else 1.0
        use_pos, use_neg = pos_precision >= precision, neg_share <= prior / purity
        fills.append((~known & unanimous_pos & use_pos, ~known & unanimous_neg & use_neg))
        figures.append({"prior": prior, "loo_positive_precision": pos_precision, "loo_negative_positive_share":
                        neg_share, "fills_positives": bool(use_pos), "fills_negatives": bool(use_neg)})
    return fills, figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="tabler")
    parser.add_argument("--label-set", choices=("hidden", "full"), default="hidden")
    parser.add_argument("--seed", type=int, default=0, help="bench_quality's seed: its validation split and hiding")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--precision", type=float, default=0.95)
    parser.add_argument("--purity", type=float, default=5.0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--write-labels", help="write the labels file with the fills as known labels here")
    args = parser.parse_args(argv)
    data_dir, _ = DATASETS[args.dataset]
    if not (data_dir / "labels.txt").is_file() or not WEIGHTS.is_file():
        sys.exit(f"error: run python -m benchmarks.prepare_{args.dataset} and benchmarks.prepare_weights first")
    # bench_quality's own split and hiding, with its defaults (test split, validation, 50% of the labels hidden)
    with tempfile.TemporaryDirectory() as folder:
        split = bench_quality.make_split(bench_quality.parse_args(["--dataset", args.dataset, "--seeds",
                                                                   str(args.seed)]), Path(folder))
        trainval = split.trainval
        validation = set(split.val_lists[args.seed].read_text().split())
        labels = LabelTable.read(split.labels_files[args.label_set, args.seed])
    train = np.array([n not in validation for n in trainval.names()])
    rows = np.where(train)[0]
    features = embeddings([trainval.names()[i] for i in rows], data_dir / "images", args.image_size)
    fills, figures = neighbour_fills(features, as_matrix(labels)[rows], args.k, args.precision, args.purity)
    truth = as_matrix(trainval)[rows]  # the labels before hiding: they score the fills, nothing else
    table_rows, filled = [], [list(r) for r in labels.rows]
    for a, (name, (positive, negative), figure) in enumerate(zip(labels.label_names, fills, figures, strict=True)):
        scored = {}
        for side, chosen, value in (("positives", positive, 1), ("negatives", negative, 0)):
            answers = truth[chosen, a]
            answers = answers[~np.isnan(answers)]
            scored[side] = {"filled": int(chosen.sum()), "checked": len(answers),
                            "right": float((answers == value).mean()) if len(answers) else None}
            for j in np.where(chosen)[0]:
                filled[rows[j]][1 + a] = str(value)
        figure.update(scored)
        table_rows.append([name, figure["prior"], figure["loo_positive_precision"],
                           figure["loo_negative_positive_share"], scored["positives"]["filled"],
                           scored["positives"]["right"], scored["negatives"]["filled"], scored["negatives"]["right"]])
    print(table(table_rows, ["attribute", "prior", "LOO precision of +", "LOO positive share of -", "+ filled",
                             "+ right (hidden)", "- filled", "- right (hidden)"]))
    if args.write_labels:
        LabelTable(labels.header, filled).write(Path(args.write_labels))
        print(f"wrote {args.write_labels}")
    name = f"neighbour_labels_{args.dataset}_{args.label_set}_s{args.seed}"
    attributes = dict(zip(labels.label_names, figures, strict=True))
    print(f"wrote {write_result(name, {'args': vars(args), 'attributes': attributes})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
