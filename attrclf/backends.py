"""Inference backends behind Predictor: preprocessed (B, C, H, W) pixels -> (B, A) logits, run by torch or ONNX Runtime.

    torch        fp32 PyTorch: channels_last, `torch.inference_mode`. The reference the others are checked against.
    torch-bf16   PyTorch under bf16 autocast; only where bf16 is native (a CPU with AVX512-BF16 or AMX, a GPU with
                 bf16): elsewhere autocast emulates it ~30x slower than fp32, so it is refused. Within 1e-2 of fp32.
    onnx         ONNX Runtime on model.onnx (fp32), written next to model.safetensors by `attrclf export`. Within 1e-4.
    onnx-int8    ONNX Runtime on model.int8.onnx: int8 static quantization calibrated on the model's validation images
                 (attrclf.quantize). Its metadata records the validation mAP of int8 and fp32 and the largest
                 probability difference from fp32 on those images: its tolerance.
    auto         the fastest of the above that this model and machine offer, within tolerance (`choose`): each is timed
                 once at load and the choice is cached per machine and model files (ATTRCLF_CACHE/backends.json).
                 onnx-int8 takes part only if its recorded mAP falls by at most MAX_MAP_DROP points.

The ONNX files travel with the model (pushed with it, fetched by `from_pretrained`); weights for torch stay safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import AttrclfError
from .fileio import atomic_write_json
from .hardware import fast_cpu_bf16

BACKENDS = ("auto", "torch", "torch-bf16", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}  # beside model.safetensors
QUANTIZATION_KEY = "attrclf_quantization"  # metadata_props entry of model.int8.onnx (written by attrclf.quantize)
MAX_MAP_DROP = 0.5  # points of validation mAP an int8 model may lose and still be a default
TOLERANCE = {"onnx": 1e-4, "torch-bf16": 1e-2}  # largest |p - p_fp32| accepted; onnx-int8's is in its metadata
AUTO_MARGIN = 0.9  # auto leaves fp32 torch only for a backend at least 10% faster: timing noise never flips it
EXTRA_HINT = "pip install 'attrclf[export]'"


class TorchBackend:
    """The model in PyTorch; fp32, or bf16 autocast where it is native."""

    def __init__(self, model: nn.Module, device: torch.device, *, channels_last: bool = True, bf16: bool = False):
        self.model, self.device, self.bf16 = model, device, bf16
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.name = "torch-bf16" if bf16 else "torch"
        if bf16 and not native_bf16(device):
            raise AttrclfError(f"--backend torch-bf16: this {device.type.upper()} has no native bf16 (AVX512-BF16 / "
                               f"AMX, or a bf16 GPU); bf16 would be emulated, far slower than fp32. "
                               f"Use --backend torch.")

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, A) fp32 logits on the device."""
        pixel_values = pixel_values.to(self.device, memory_format=self.layout)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(pixel_values).float()


class OnnxBackend:
    """An exported graph (pixel_values -> logits) in an ONNX Runtime session with every graph optimisation on."""

    def __init__(self, path: str | os.PathLike, name: str, device: torch.device, *, threads: int | None = None):
        ort = import_onnxruntime(name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()  # torch's setting rules both runtimes
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: on shared cores a spinning pool steals them from everything else
        # (torch in the same process ran 20x slower beside spinning sessions here)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise AttrclfError(f"--backend {name} on {device}: this onnxruntime has no CUDA provider (install "
                                   f"onnxruntime-gpu), or use --backend torch")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise AttrclfError(f"cannot load '{path}' in onnxruntime: {type(e).__name__}: {e}") from e
        self.name, self.path = name, Path(path)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, A) fp32 logits (on the CPU)."""
        pixels = pixel_values.detach().cpu().contiguous().numpy()  # ONNX takes NCHW, contiguous
        (logits,) = self.session.run(["logits"], {"pixel_values": pixels})
        return torch.from_numpy(logits)

    @property
    def quantization(self) -> dict | None:
        """What attrclf.quantize recorded: mAP of int8 and fp32 on validation, the largest probability difference."""
        text = self.metadata.get(QUANTIZATION_KEY)
        return json.loads(text) if text else None


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and fast_cpu_bf16()


def import_onnxruntime(backend: str):
    try:
        import onnxruntime
    except ModuleNotFoundError as e:
        raise AttrclfError(f"--backend {backend} needs onnxruntime, which is not installed: {EXTRA_HINT}") from e
    return onnxruntime


def int8_refusal(record: dict | None) -> str | None:
    """Why a quantized model may not be a default (no record, or validation mAP fell too far); None when it may."""
    if not record:
        return "its metadata records no validation mAP (export it again with `attrclf export`)"
    change = record.get("mAP_change_points")
    if change is None:
        return "its validation mAP could not be measured"
    if change < -MAX_MAP_DROP:
        return f"its validation mAP falls {-change:.2f} points (more than {MAX_MAP_DROP})"
    return None


# ---------------------------------------------------------------- auto: the fastest within tolerance


@dataclass
class Candidate:
    """A backend `auto` may pick: built, timed (ms, lower is better) and checked against fp32 torch."""

    backend: object
    ms_batch1: float = 0.0
    ms_per_image_batch8: float = 0.0
    max_prob_diff: float = 0.0
    refused: str | None = None

    @property
    def score(self) -> float:
        """Latency of one image plus the per-image time of a batch of 8: serving and bulk weigh alike."""
        return self.ms_batch1 + self.ms_per_image_batch8


@dataclass
class Choice:
    """What `auto` measured and chose."""

    backend: str
    timings: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    cached: bool = False


def time_backend(backend, pixels: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    """(median ms of a batch of 1, median ms per image of a batch of 8), after a warm-up call of each."""
    one, eight = pixels[:1], pixels

    def median_ms(batch, n):
        backend.logits(batch)  # warm-up: ONNX Runtime and oneDNN plan on the first call
        times = []
        for _ in range(n):
            start = time.perf_counter()
            backend.logits(batch)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000)

    return median_ms(one, repeats), median_ms(eight, max(2, repeats // 2)) / len(eight)


def measure(candidates: list[Candidate], input_size: list[int]) -> None:
    """Time every candidate on the same seeded pixels and record how far its probabilities are from the first's
    (fp32 torch); a backend off by more than its TOLERANCE is refused."""
    pixels = torch.randn(8, *input_size, generator=torch.Generator().manual_seed(0))
    reference = torch.sigmoid(candidates[0].backend.logits(pixels).cpu())
    for candidate in candidates:
        name = candidate.backend.name
        probs = torch.sigmoid(candidate.backend.logits(pixels).cpu())
        candidate.max_prob_diff = float((probs - reference).abs().max())
        if name in TOLERANCE and candidate.max_prob_diff > TOLERANCE[name]:
            candidate.refused = f"differs from fp32 by {candidate.max_prob_diff:.1e} (> {TOLERANCE[name]:g})"
            continue
        candidate.ms_batch1, candidate.ms_per_image_batch8 = time_backend(candidate.backend, pixels)


def choose(candidates: list[Candidate]) -> Candidate:
    """The fastest accepted candidate; fp32 torch (the first) unless another beats it by more than AUTO_MARGIN."""
    reference = candidates[0]
    accepted = [c for c in candidates[1:] if c.refused is None]
    best = min(accepted, key=lambda c: c.score, default=None)
    return best if best is not None and best.score < AUTO_MARGIN * reference.score else reference


def cache_path() -> Path:
    return Path(os.environ.get("ATTRCLF_CACHE", Path.home() / ".cache" / "attrclf")) / "backends.json"


def machine_key(device: torch.device) -> dict:
    """What makes timings comparable: the CPU (model and vector extensions), threads, device and runtime versions."""
    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    try:
        from importlib.metadata import version
        ort_version = version("onnxruntime")
    except Exception:  # not installed
        ort_version = None
    return {"cpu": cpu, "machine": platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
            "bf16": fast_cpu_bf16(), "threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "onnxruntime": ort_version}


def files_key(paths: list[Path]) -> list:
    """The model files, identified cheaply: resolved path (a Hub cache blob is named by its hash), size, mtime."""
    out = []
    for path in paths:
        real = Path(os.path.realpath(path))
        stat = real.stat()
        out.append([str(real), stat.st_size, stat.st_mtime_ns])
    return out


def choice_key(device: torch.device, paths: list[Path]) -> str:
    content = {"machine": machine_key(device), "files": files_key(paths)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def cached_choice(key: str) -> dict | None:
    try:
        return json.loads(cache_path().read_text()).get(key)
    except (OSError, ValueError):
        return None


def remember_choice(key: str, choice: Choice) -> None:
    """Add the choice to the cache file; a cache that cannot be written is left alone (the next load times again)."""
    path = cache_path()
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = {"backend": choice.backend, "timings": choice.timings, "refused": choice.refused,
                    "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entries)
    except OSError:
        pass


# ---------------------------------------------------------------- building one by name


WEIGHTS_KEY = "attrclf_weights_sha256"  # metadata_props entry: the model.safetensors an ONNX file was exported from


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 of a weights file (about 30 ms for ResNet18's 45 MB with SHA extensions)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_export_matches(backend: OnnxBackend, config: dict, weights_sha256: str | None) -> None:
    """An ONNX file must come from these weights and this config.json (a model trained again and not exported again
    would otherwise answer with the old weights)."""
    exported = json.loads(backend.metadata.get(WEIGHTS_KEY, "null"))
    if exported and weights_sha256 and exported != weights_sha256:
        raise AttrclfError(f"'{backend.path.name}' was exported from other weights than this model.safetensors: "
                           f"export it again with `attrclf export MODEL_DIR`")
    saved = json.loads(backend.metadata.get("attrclf_config", "{}"))
    ignore = {"thresholds", "attrclf_version"}  # thresholds are applied from config.json, never from the graph
    differs = sorted(k for k in set(saved) | set(config) if k not in ignore and saved.get(k) != config.get(k))
    if differs:
        raise AttrclfError(f"'{backend.path.name}' was exported from a model whose config differs in "
                           f"{', '.join(differs)}: export it again with `attrclf export MODEL_DIR`")


@dataclass
class ModelFiles:
    """Where a model's files are: model.safetensors, and a function that finds (or fetches) a file beside it, None
    when the model has no such file."""

    weights: Path
    locate: object  # (filename) -> Path | None

    def onnx(self, name: str) -> Path | None:
        return self.locate(ONNX_FILES[name])


def build(name: str, model: nn.Module, device: torch.device, files: ModelFiles, *, channels_last: bool = True,
          weights_sha256: str | None = None):
    """The backend `name` (not auto) for this model; a clear AttrclfError when it cannot run here."""
    if name in ("torch", "torch-bf16"):
        return TorchBackend(model, device, channels_last=channels_last, bf16=name == "torch-bf16")
    if name not in ONNX_FILES:
        raise AttrclfError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
    import_onnxruntime(name)
    path = files.onnx(name)
    if path is None:
        raise AttrclfError(f"--backend {name}: the model has no {ONNX_FILES[name]}; write it next to "
                           f"model.safetensors with `attrclf export MODEL_DIR` (and push it with the model)")
    backend = OnnxBackend(path, name, device)
    check_export_matches(backend, asdict(model.config), weights_sha256 or weights_digest(files.weights))
    return backend


def onnxruntime_installed() -> bool:
    try:
        import_onnxruntime("onnx")
    except AttrclfError:
        return False
    return True


def auto(model: nn.Module, device: torch.device, files: ModelFiles, *, channels_last: bool = True):
    """(backend, Choice): the cached choice for this machine and these files, else every candidate timed now."""
    names = ["torch"] + (["torch-bf16"] if native_bf16(device) else [])
    onnx_paths = {}
    if onnxruntime_installed():
        onnx_paths = {name: path for name in ONNX_FILES if (path := files.onnx(name)) is not None}
    key = choice_key(device, [files.weights, *onnx_paths.values()])
    settings = dict(channels_last=channels_last)
    cached = cached_choice(key)
    if cached and cached.get("backend") in names + list(onnx_paths):
        backend = build(cached["backend"], model, device, files, **settings)
        return backend, Choice(cached["backend"], cached.get("timings", {}), cached.get("refused", {}), cached=True)
    candidates, refused = [], {}
    digest = weights_digest(files.weights) if onnx_paths else None
    for name in names + list(onnx_paths):
        try:
            backend = build(name, model, device, files, weights_sha256=digest, **settings)
        except AttrclfError as e:
            refused[name] = str(e)
            continue
        reason = int8_refusal(backend.quantization) if name == "onnx-int8" else None
        if reason:
            refused[name] = reason
            continue
        candidates.append(Candidate(backend))
    measure(candidates, list(model.config.input_size))
    refused |= {c.backend.name: c.refused for c in candidates if c.refused}
    best = choose(candidates)
    timings = {c.backend.name: {"ms_batch1": round(c.ms_batch1, 3), "ms_per_image_batch8": round(c.ms_per_image_batch8,
               3), "max_prob_diff": c.max_prob_diff} for c in candidates if not c.refused}
    choice = Choice(best.backend.name, timings, refused)
    remember_choice(key, choice)
    return best.backend, choice
