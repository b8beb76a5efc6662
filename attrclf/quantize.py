"""int8 static quantization of an exported model, calibrated and scored on the model's own validation images.

`attrclf export` calls `quantize`: the fp32 graph (model.onnx) goes through onnxruntime's pre-processing (shape
inference, BatchNorm folding), then `quantize_static` with per-channel int8 weights and uint8 activations whose ranges
come from the validation images (MinMax calibration; QDQ format by default: measured faster than QOperator on the
AVX512-VNNI EPYC, see benchmarks/README.md "Fast inference"). Two parts stay fp32 (Settings.keep_float): the first
convolution, which reads the normalised pixels, and attrclf's head (its Linear layers and BatchNorm1d): on five
MobileNetV2 emoji models quantizing everything moved validation mAP by -1.7 to +1.0 point, keeping those two fp32 by
-0.5 to +0.4 (percentile, moving-average and symmetric ranges, more calibration images and fp32 depthwise convolutions
did worse; onnxruntime's Entropy equals MinMax here: its 128 histogram bins leave no threshold to search). The int8
graph is then scored on the same images and the record below goes into its metadata_props (key
attrclf.backends.QUANTIZATION_KEY):

    format, calibration (where the images came from), images (how many), mAP_fp32 (torch fp32 on them), mAP_int8,
    mAP_change_points (100 x (int8 - fp32)), max_prob_diff (largest |p_int8 - p_fp32| over every image and attribute:
    the tolerance of the onnx-int8 backend), default_allowed (mAP fell by at most MAX_MAP_DROP points), and the
    settings: calibration_method, keep_float, nodes_kept_float, symmetric_activations, moving_average,
    calibration_images.

Validation images: those of the training run, found again from train_config.json (the same --data, --labels, --images,
--group-column, --val-fraction and --seed give the same seeded split; the image count is checked against metrics.json),
or `--calibrate DATA` (any `--data` source; its validation split if it has one, else all of it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import MAX_MAP_DROP, QUANTIZATION_KEY, OnnxBackend
from .errors import AttrclfError
from .fileio import atomic_path

FORMATS = ("qdq", "qoperator")
MAX_CALIBRATION_IMAGES = 512  # ranges settle long before; scoring still uses every validation image
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
NODE_KINDS = ("depthwise", "first", "head")  # what Settings.keep_float may name: see node_kinds
KEEP_FLOAT = ("first", "head")  # left in fp32 by default: measured, benchmarks/README.md "Fast inference"


@dataclass
class LabelledImages:
    """Images with known labels (1 / 0 / None) in the model's attribute order."""

    images: list  # sources load_image reads (paths or {"path", "bytes"})
    labels: list[list[int | None]]
    description: str


def from_split(ds, label_names: list[str], model_names: list[str], description: str) -> LabelledImages:
    """A split in attrclf.sources' schema, its columns put in the model's attribute order (missing ones NA)."""
    missing = [n for n in label_names if n not in model_names]
    if missing:
        raise AttrclfError(f"{description}: attributes {', '.join(missing)} are not the model's "
                           f"({', '.join(model_names)})")
    where = [label_names.index(n) if n in label_names else None for n in model_names]
    labels = [[row[i] if i is not None else None for i in where] for row in ds["labels"]]
    return LabelledImages(list(ds["image"]), labels, description)


def training_validation(model_dir: Path, model_names: list[str]) -> LabelledImages | None:
    """The validation split of the run that trained the model in `model_dir`, rebuilt from train_config.json; None
    when the folder has no train_config.json / metrics.json or the data is not where training read it."""
    config_file, metrics_file = model_dir / "train_config.json", model_dir / "metrics.json"
    if not (config_file.is_file() and metrics_file.is_file()):
        return None
    cfg, metrics = json.loads(config_file.read_text()), json.loads(metrics_file.read_text())
    from . import demo
    from .sources import prepare_data  # imports `datasets`: export time only

    data = cfg.get("data") or str(demo.default_root(cfg.get("demo_size") or 3000, 64))
    if not Path(data).exists():
        return None
    split = prepare_data(data, images=cfg.get("images"), labels=cfg.get("labels"),
                         label_columns=cfg.get("label_columns"), group_column=cfg.get("group_column"),
                         val_fraction=cfg.get("val_fraction", 0.2), seed=cfg.get("seed", 42))
    expected = metrics.get("data", {}).get("validation_images")
    if expected is not None and expected != len(split.validation):
        raise AttrclfError(f"the training data at '{data}' now gives {len(split.validation)} validation images, "
                           f"training had {expected}: it changed. Pass --calibrate DATA (labelled images) instead")
    return from_split(split.validation, split.label_names, model_names, f"the training run's validation split "
                      f"({split.split})")


def calibration_source(data: str, model_names: list[str]) -> LabelledImages:
    """--calibrate DATA: any `--data` source; its validation split if it has one, else all of it."""
    from .images import drop_unreadable
    from .sources import VALIDATION_SPLITS, load_source

    source = load_source(data)
    name = next((s for s in VALIDATION_SPLITS if s in source.splits), None) or next(iter(source.splits))
    ds, _ = drop_unreadable(source.splits[name])
    if len(ds) == 0:
        raise AttrclfError(f"--calibrate '{data}': no readable images")
    return from_split(ds, source.label_names, model_names, f"{source.description} [{name}]")


def pixels_of(predictor, images: list, batch_size: int = 32) -> list[np.ndarray]:
    """The model's preprocessing of every image, as (B, C, H, W) float32 batches."""
    return [np.stack([predictor.preprocess(image).numpy() for image in images[i : i + batch_size]])
            for i in range(0, len(images), batch_size)]


class BatchReader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed batches."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"pixel_values": batch}

    def rewind(self) -> None:  # part of the protocol; the calibrators read the batches once
        pass


def mean_ap(probs: np.ndarray, labels: list[list[int | None]], label_names: list[str]) -> float | None:
    """Validation mAP as `attrclf evaluate` computes it (NA skipped; one-class attributes left out)."""
    from .evaluate import score_attributes

    _, summary = score_attributes(probs, labels, label_names, [0.5] * len(label_names))
    return summary["mAP"]


@dataclass(frozen=True)
class Settings:
    """How quantize_static is called; recorded in the int8 model's metadata beside the mAP figures."""

    method: str = "minmax"  # activation range calibration: one of CALIBRATION_METHODS
    percentile: float = 99.999  # for method "percentile"
    keep_float: tuple[str, ...] = KEEP_FLOAT  # node kinds left in fp32: entries of NODE_KINDS
    symmetric_activations: bool = False  # ActivationSymmetric (ranges centred on 0)
    moving_average: bool = False  # CalibMovingAverage (MinMax: ranges averaged over batches, not the extremes)
    calibration_images: int = MAX_CALIBRATION_IMAGES

    def record(self) -> dict:
        out = {"calibration_method": self.method, "keep_float": list(self.keep_float),
               "symmetric_activations": self.symmetric_activations, "moving_average": self.moving_average}
        return out | ({"percentile": self.percentile} if self.method == "percentile" else {})


def node_kinds(model) -> dict[str, list[str]]:
    """Names of the nodes of each kind in NODE_KINDS: depthwise Conv (group == input channels > 1, so one filter per
    channel), the first Conv (the one reading the graph input), the head (every node with a weight of attrclf's head
    module, `head.*`: its Linear layers and the BatchNorm1d pre-processing cannot fold into a convolution)."""
    weights = {w.name: list(w.dims) for w in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]

    def group(node) -> int:
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    depthwise = [n.name for n in convs if group(n) > 1 and weights.get(n.input[1], [0, 0])[1] == 1]
    inputs = {i.name for i in model.graph.input}
    first = [n.name for n in convs if n.input[0] in inputs][:1]
    head = [n.name for n in model.graph.node if any(i.startswith("head.") for i in n.input if i in weights)]
    return {"depthwise": depthwise, "first": first, "head": head}


def excluded_nodes(model, keep_float: tuple[str, ...]) -> list[str]:
    unknown = [k for k in keep_float if k not in NODE_KINDS]
    if unknown:
        raise AttrclfError(f"quantization: unknown node kind(s) {', '.join(unknown)} to keep in fp32 "
                           f"(known: {', '.join(NODE_KINDS)})")
    kinds = node_kinds(model)
    return [name for kind in keep_float for name in kinds[kind]]


def quantize(predictor, fp32_path: Path, out_path: Path, images: LabelledImages, fmt: str = "qdq",
             settings: Settings = Settings()) -> dict:
    """Write the int8 model to `out_path` (atomically) and return the record stored in its metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if fmt not in FORMATS:
        raise AttrclfError(f"--quant-format must be one of {', '.join(FORMATS)} (got '{fmt}')")
    if settings.method not in CALIBRATION_METHODS:
        raise AttrclfError(f"quantization: calibration method must be one of {', '.join(CALIBRATION_METHODS)} "
                           f"(got '{settings.method}')")
    batches = pixels_of(predictor, images.images)
    calibration = batches[: -(-settings.calibration_images // 32)]
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[settings.method]
    extra = {"ActivationSymmetric": settings.symmetric_activations, "CalibMovingAverage": settings.moving_average}
    if settings.method == "percentile":
        extra["CalibPercentile"] = settings.percentile
    with atomic_path(out_path) as temporary:
        prepared = temporary.with_name(temporary.name + ".prep.onnx")
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            exclude = excluded_nodes(onnx.load(str(prepared)), settings.keep_float)
            quantize_static(str(prepared), str(temporary), BatchReader(calibration),
                            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, nodes_to_exclude=exclude, extra_options=extra)
        finally:
            prepared.unlink(missing_ok=True)
        record = score(predictor, temporary, batches, images, fmt) | settings.record() | {
            "calibration_images": min(len(images.images), settings.calibration_images),
            "nodes_kept_float": len(exclude)}
        proto = onnx.load(str(temporary))
        for entry in onnx.load(str(fp32_path), load_external_data=False).metadata_props:
            proto.metadata_props.add(key=entry.key, value=entry.value)
        proto.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps(record))
        onnx.save(proto, str(temporary))
    return record


def score(predictor, int8_path: Path, batches: list[np.ndarray], images: LabelledImages, fmt: str) -> dict:
    """The quantization record: mAP of fp32 torch and of the int8 graph on the images, and their largest
    probability difference."""
    import torch

    int8 = OnnxBackend(int8_path, "onnx-int8", torch.device("cpu"))
    reference = np.concatenate([predictor.batch_probs(torch.from_numpy(b)).cpu().numpy() for b in batches])
    quantized = np.concatenate([torch.sigmoid(int8.logits(torch.from_numpy(b))).numpy() for b in batches])
    names = predictor.label_names
    fp32_map, int8_map = mean_ap(reference, images.labels, names), mean_ap(quantized, images.labels, names)
    change = None if fp32_map is None or int8_map is None else round(100 * (int8_map - fp32_map), 4)
    return {"format": fmt, "calibration": images.description, "images": len(images.images),
            "mAP_fp32": fp32_map,
            "mAP_int8": int8_map, "mAP_change_points": change,
            "max_prob_diff": float(np.abs(quantized - reference).max()),
            "default_allowed": change is not None and change >= -MAX_MAP_DROP, "max_map_drop_points": MAX_MAP_DROP}


def find_images(model_id: str, calibrate: str | None, model_names: list[str]) -> LabelledImages | None:
    """--calibrate DATA, else the training run's validation split when the model folder lets us rebuild it."""
    if calibrate:
        return calibration_source(calibrate, model_names)
    return training_validation(Path(model_id), model_names) if os.path.isdir(model_id) else None
