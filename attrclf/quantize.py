"""int8 static quantization of an exported model, calibrated and scored on the model's own validation images.

`attrclf export` calls `quantize`: the fp32 graph (model.onnx) goes through onnxruntime's pre-processing (shape
inference, BatchNorm folding), then `quantize_static` with per-channel int8 weights and uint8 activations whose ranges
come from the validation images (MinMax calibration; QDQ format by default: measured faster than QOperator on the
AVX512-VNNI EPYC, see benchmarks/README.md "Fast inference"). The int8 graph is then scored on the same images and the
record below goes into its metadata_props (key attrclf.backends.QUANTIZATION_KEY):

    format, calibration (where the images came from), images (how many), mAP_fp32 (torch fp32 on them), mAP_int8,
    mAP_change_points (100 x (int8 - fp32)), max_prob_diff (largest |p_int8 - p_fp32| over every image and attribute:
    the tolerance of the onnx-int8 backend), default_allowed (mAP fell by at most MAX_MAP_DROP points).

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

    def rewind(self) -> None:  # not used by MinMax; part of the protocol
        pass


def mean_ap(probs: np.ndarray, labels: list[list[int | None]], label_names: list[str]) -> float | None:
    """Validation mAP as `attrclf evaluate` computes it (NA skipped; one-class attributes left out)."""
    from .evaluate import score_attributes

    _, summary = score_attributes(probs, labels, label_names, [0.5] * len(label_names))
    return summary["mAP"]


def quantize(predictor, fp32_path: Path, out_path: Path, images: LabelledImages, fmt: str = "qdq") -> dict:
    """Write the int8 model to `out_path` (atomically) and return the record stored in its metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if fmt not in FORMATS:
        raise AttrclfError(f"--quant-format must be one of {', '.join(FORMATS)} (got '{fmt}')")
    batches = pixels_of(predictor, images.images)
    calibration = batches[: -(-MAX_CALIBRATION_IMAGES // 32)]
    with atomic_path(out_path) as temporary:
        prepared = temporary.with_name(temporary.name + ".prep.onnx")
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(temporary), BatchReader(calibration),
                            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            prepared.unlink(missing_ok=True)
        record = score(predictor, temporary, batches, images, fmt)
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
            "calibration_images": min(len(images.images), MAX_CALIBRATION_IMAGES), "mAP_fp32": fp32_map,
            "mAP_int8": int8_map, "mAP_change_points": change,
            "max_prob_diff": float(np.abs(quantized - reference).max()),
            "default_allowed": change is not None and change >= -MAX_MAP_DROP, "max_map_drop_points": MAX_MAP_DROP}


def find_images(model_id: str, calibrate: str | None, model_names: list[str]) -> LabelledImages | None:
    """--calibrate DATA, else the training run's validation split when the model folder lets us rebuild it."""
    if calibrate:
        return calibration_source(calibrate, model_names)
    return training_validation(Path(model_id), model_names) if os.path.isdir(model_id) else None
