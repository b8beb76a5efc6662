"""AttrConfig (the model's config.json) and AttrClassifier: a timm backbone plus a small multilabel head.

No `from __future__ import annotations` here: PyTorchModelHubMixin reads the `config: AttrConfig` annotation at run time
to rebuild the dataclass from config.json.
"""

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin, constants, hf_hub_download
from timm.data import resolve_data_config
from timm.models import group_parameters
from torch import nn

from . import __version__
from .card import render_card
from .errors import AttrclfError
from .heads import HEAD_TYPES, build_head

ALL_STAGES = "all"
GEOMETRIES = ("whole", "crop")  # see attrclf.transforms


@dataclass
class AttrConfig:
    """Everything needed to rebuild the model, preprocess an image and name the outputs.

    Attributes:
        label_names: One name per attribute, in output order.
        backbone: timm model name.
        head_hidden: Width of the hidden layer of the head; 0 means a single Linear.
        head_dropout: Dropout before the first Linear of the head.
        hidden_dropout: Dropout before the last Linear (unused when head_hidden is 0).
        head_type: "mlp" (pooled features, the three fields above) or "query" (attribute queries attending to every
            position of the feature map, the query_* fields below); see attrclf.heads.
        query_dim: Width of the query head's queries and attention.
        query_heads: Attention heads of the query head (they divide query_dim).
        query_layers: Decoder layers of the query head.
        query_dropout: Dropout inside the query head.
        input_size: (C, H, W) the model sees.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        interpolation: Resize interpolation ("bicubic", "bilinear", ...).
        crop_pct: Crop fraction of the evaluation transform (1.0 with crop_mode "squash": the whole image).
        crop_mode: timm crop mode of the evaluation transform ("squash", "center" or "border").
        thresholds: Per-attribute decision thresholds on probabilities (tuned on validation by training).
        attrclf_version: The attrclf version that made the model (a config.json written before the field existed
            loads with the running version).
    """

    label_names: list[str]
    backbone: str = "resnet18"
    head_hidden: int = 0
    head_dropout: float = 0.5
    hidden_dropout: float = 0.3
    # config.json files written before the query head existed have none of these: the defaults are the MLP head
    head_type: str = "mlp"
    query_dim: int = 256
    query_heads: int = 4
    query_layers: int = 1
    query_dropout: float = 0.1
    input_size: list[int] = field(default_factory=lambda: [3, 224, 224])
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "squash"
    thresholds: list[float] = field(default_factory=list)
    attrclf_version: str = __version__

    def __post_init__(self):
        self.label_names = list(self.label_names)
        if not self.label_names:
            raise AttrclfError("a model needs at least one attribute (label_names is empty)")
        if not self.thresholds:
            self.thresholds = [0.5] * len(self.label_names)
        self.thresholds = [float(t) for t in self.thresholds]
        if len(self.thresholds) != len(self.label_names):
            raise AttrclfError(
                f"config has {len(self.thresholds)} thresholds for {len(self.label_names)} attributes"
            )
        self.input_size = [int(v) for v in self.input_size]
        self.check_head()
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]

    @property
    def geometry(self) -> str:
        """"whole" when evaluation sees the whole image (squash at crop_pct 1), else "crop" (see attrclf.transforms)."""
        return "whole" if self.crop_mode == "squash" and self.crop_pct >= 1.0 else "crop"

    def check_head(self) -> None:
        """Raise AttrclfError for a head this config cannot build."""
        if self.head_type not in HEAD_TYPES:
            raise AttrclfError(f"unknown head type '{self.head_type}'; choose one of: {', '.join(HEAD_TYPES)}")
        if self.head_type == "query" and (self.query_heads < 1 or self.query_dim % self.query_heads):
            raise AttrclfError(f"the query head's width {self.query_dim} (--query-dim) must be a multiple of its "
                               f"attention heads {self.query_heads} (--query-heads)")

    @classmethod
    def for_backbone(cls, backbone: str, label_names: list[str], image_size: int | None = None, *,
                     geometry: str = "whole", **head) -> "AttrConfig":
        """A config whose normalisation and interpolation come from the backbone's timm pretrained config.

        Args:
            backbone: timm model name.
            label_names: Attribute names.
            image_size: Square input size; None keeps the backbone's own.
            geometry: "whole" (the whole image resized, nothing cropped) or "crop" (the backbone's centre crop).
            **head: head_hidden / head_dropout / hidden_dropout overrides.
        """
        if geometry not in GEOMETRIES:
            raise AttrclfError(f"--geometry must be one of {', '.join(GEOMETRIES)} (got '{geometry}')")
        check_backbone_name(backbone)
        pretrained_cfg = timm.models.get_pretrained_cfg(backbone)
        data_cfg = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
        input_size = list(data_cfg["input_size"])
        if image_size:
            input_size = [input_size[0], image_size, image_size]
        return cls(
            label_names=list(label_names),
            backbone=backbone,
            input_size=input_size,
            mean=list(data_cfg["mean"]),
            std=list(data_cfg["std"]),
            interpolation=data_cfg["interpolation"],
            crop_pct=1.0 if geometry == "whole" else data_cfg["crop_pct"],
            crop_mode="squash" if geometry == "whole" else data_cfg.get("crop_mode", "center"),
            **head,
        )


def check_backbone_name(backbone: str) -> None:
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('.')[0][:6]}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise AttrclfError(f"unknown backbone '{backbone}': it is not a timm model name.{hint}")


def create_head(config: AttrConfig, backbone: nn.Module) -> nn.Module:
    """The head config.head_type names, sized for what it reads of the backbone (see AttrClassifier.features)."""
    num_labels = len(config.label_names)
    if config.head_type == "query":  # reads forward_features: num_features channels (or token width)
        return build_head("query", backbone.num_features, num_labels, dim=config.query_dim, heads=config.query_heads,
                          layers=config.query_layers, dropout=config.query_dropout)
    # reads the pooled output: head_hidden_size, which differs from num_features where timm adds a layer after the
    # pooling (MobileNetV3's conv_head); the same number everywhere else, so saved MLP heads keep their shapes
    pooled = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    return build_head("mlp", pooled, num_labels, hidden=config.head_hidden, dropout=config.head_dropout,
                      hidden_dropout=config.hidden_dropout)


def create_backbone(name: str, pretrained: bool = False, weights_file: str | None = None,
                    drop_path: float = 0.0) -> nn.Module:
    """A timm backbone without its classifier (forward gives pooled features).

    Args:
        name: timm model name.
        pretrained: Download the backbone's default pretrained weights from the Hub.
        weights_file: Load pretrained weights from this local file instead (no network).
        drop_path: timm's drop_path_rate (stochastic depth while training, rising with depth to this value); it
            adds no parameters, so a model saved with it loads into one built without.
    """
    check_backbone_name(name)
    kwargs = {"num_classes": 0}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
        try:  # a family without stochastic depth (VGG) refuses the argument: say so before loading any weights
            with torch.device("meta"):
                timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as e:
            raise AttrclfError(f"--drop-path: backbone '{name}' has no stochastic depth (timm: {e}); "
                               f"use --drop-path 0 with it") from e
    if weights_file:
        if not Path(weights_file).is_file():
            raise AttrclfError(f"--backbone-weights: file '{weights_file}' does not exist")
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file)), **kwargs
            )
        except (RuntimeError, ValueError, OSError) as e:
            raise AttrclfError(
                f"--backbone-weights: could not load '{weights_file}' into backbone '{name}': {e}"
            ) from e
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # network, offline mode, missing files: all mean "no weights here"
        raise AttrclfError(
            f"could not download pretrained weights for backbone '{name}' from the Hugging Face Hub "
            f"(no network or Hub unreachable?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"  Use --backbone-weights FILE to load a local weights file (.safetensors or .pth), "
            f"or --no-pretrained to train the backbone from scratch."
        ) from e


DEPTH_STAGES = 4  # a backbone whose blocks all keep one resolution (ViT) is cut into this many stages by depth


def backbone_stages(backbone: nn.Module) -> list[list[str]]:
    """Backbone parameter names grouped into stages, stem first, the same way in every timm family.

    A stage is what one resolution level of the backbone holds (timm's `feature_info`): ResNet's layer4,
    EfficientNet's and MobileNet's stride-32 blocks with their head conv, ConvNeXt's stages.3 with its final norm.
    Parameters between two feature modules belong to the later one; the ones after the last (head convs, final
    norms) to the last stage. A backbone whose levels all share one reduction (ViT, whose every block is a feature
    module at stride 16) is cut into DEPTH_STAGES stages of consecutive blocks. Without feature_info, timm's coarse
    parameter groups are the stages.
    """
    names = [name for name, _ in backbone.named_parameters()]
    info = getattr(backbone, "feature_info", None)
    modules = [entry["module"] for entry in info] if info else []
    if not modules:
        groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
        return [group for _, group in sorted(groups.items())]
    level_of = _feature_levels(names, modules)
    reductions = [entry["reduction"] for entry in info]
    if len(set(reductions)) == 1:  # one resolution: stages by depth
        size = -(-len(modules) // DEPTH_STAGES)
        key = [level // size for level in range(len(modules))]
    else:  # levels of equal reduction are one stage
        distinct = sorted(set(reductions))
        key = [distinct.index(r) for r in reductions]
    stages: dict[int, list[str]] = {}
    for name in names:
        stages.setdefault(key[level_of[name]], []).append(name)
    return [stages[k] for k in sorted(stages)]


def _feature_levels(names: list[str], modules: list[str]) -> dict[str, int]:
    """Feature level of each parameter: the feature module it sits in, else the next one after it (the last one for
    parameters after every feature module)."""
    inside = {}
    for name in names:
        for level, module in enumerate(modules):
            if name == module or name.startswith(module + "."):
                inside[name] = level
                break
    levels, pending = {}, []
    for name in names:
        if name in inside:
            for waiting in pending:
                levels[waiting] = inside[name]
            pending = []
            levels[name] = inside[name]
        else:
            pending.append(name)
    for waiting in pending:
        levels[waiting] = len(modules) - 1
    return levels


class AttrClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="attrclf",
    tags=["image-classification", "multilabel", "attribute-classification", "timm"],
    pipeline_tag="image-classification",
):
    """timm backbone -> features (pooled, or the feature map for a spatial head) -> head -> (B, A) logits.

    `from_pretrained` rebuilds the model from config.json with random backbone weights (it never downloads the
    backbone), then loads model.safetensors strictly.
    """

    def __init__(self, config: AttrConfig, pretrained: bool = False, backbone_weights: str | None = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.config = config
        self.frozen_bn_stats = False  # a training setting (--freeze-bn-stats), never saved: see `train`
        self.warm_bn_stages: int | str = 0  # a training setting (--warm-bn-stats), never saved: see `train`
        # drop_path (--drop-path) is a training setting too, never saved: it only acts in train mode
        self.backbone = create_backbone(config.backbone, pretrained=pretrained, weights_file=backbone_weights,
                                        drop_path=drop_path)
        self.head = create_head(config, self.backbone)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the head reads of (B, C, H, W) normalised pixels.

        (B, F) pooled features for the MLP head; for a spatial head (the query head) timm's unpooled
        `forward_features`: a (B, F, H', W') feature map (NHWC backbones such as Swin are turned to NCHW), or (B, N, F)
        ViT tokens.
        """
        if not self.head.spatial:
            return self.backbone(pixel_values)
        features = self.backbone.forward_features(pixel_values)
        if features.ndim == 4 and getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":
            features = features.permute(0, 3, 1, 2)
        return features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised pixels -> (B, A) logits."""
        return self.head(self.features(pixel_values))

    # ---- which parameters train in which stage ----

    def backbone_stages(self) -> list[list[str]]:
        """Backbone parameter names grouped by stage, stem first (see `backbone_stages`)."""
        return backbone_stages(self.backbone)

    def set_trainable(self, unfreeze_stages: int | str) -> None:
        """Head always trains; the backbone trains its last `unfreeze_stages` stages (0: none, "all": every one)."""
        trainable = self._stage_parameter_names(unfreeze_stages)
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name in trainable)
        for param in self.head.parameters():
            param.requires_grad_(True)
        self.train(self.training)  # re-apply BatchNorm modes for the new frozen set

    def train(self, mode: bool = True):
        """Like nn.Module.train, but BatchNorm layers whose parameters are all frozen stay in eval mode.

        A frozen stage must not drift: in train mode its running statistics would still change. Two training
        settings change that: `frozen_bn_stats` (--freeze-bn-stats) puts every BatchNorm in eval mode, and
        `warm_bn_stages` (--warm-bn-stats) lets the BatchNorms of the last stages, frozen or not, follow the data's
        statistics (the stages fine-tuning will unfreeze, so the switch does not move the statistics under the head).
        """
        super().train(mode)
        if mode and self.frozen_bn_stats:  # --freeze-bn-stats: every BatchNorm normalises with its running statistics
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if mode:
            warm = self._stage_parameter_names(self.warm_bn_stages) if not self.frozen_bn_stats else set()
            for name, module in self.backbone.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    params = list(module.parameters(recurse=False))
                    if params and not any(p.requires_grad for p in params) and f"{name}.weight" not in warm:
                        module.eval()
        return self

    def _stage_parameter_names(self, stages: int | str) -> set[str]:
        """Names of the backbone parameters in its last `stages` stages (0: none, "all": every one)."""
        groups = self.backbone_stages()
        n = len(groups) if stages == ALL_STAGES else max(0, min(int(stages), len(groups)))
        return {name for names in groups[len(groups) - n:] for name in names}

    # ---- saving: attrclf's card, never the mixin's generic one ----

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """attrclf's card (hub_card.md) from the config alone, for save_pretrained / push_to_hub outside training.

        Training writes the full card (data, procedure, evaluation) before it saves, and save_pretrained keeps a
        README.md that is already there.
        """
        return render_card(asdict(self.config))

    # ---- loading: strict, safetensors only ----

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        **model_kwargs,
    ):
        model_kwargs.pop("strict", None)  # always strict
        if not isinstance(model_kwargs.get("config"), AttrConfig):
            if not os.path.isdir(model_id):
                # The mixin swallows the Hub's answer for config.json: ask again, so that a missing repo, a private
                # one without a token or a missing revision raises huggingface_hub's own error.
                hf_hub_download(repo_id=model_id, filename=constants.CONFIG_NAME, revision=revision,
                                cache_dir=cache_dir, token=token, local_files_only=local_files_only)
            raise AttrclfError(f"'{model_id}' has no attrclf config.json: is it a model saved by attrclf?")
        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            model_file = os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE)
            if not os.path.isfile(model_file):
                raise AttrclfError(f"model folder '{model_id}' has no {constants.SAFETENSORS_SINGLE_FILE}")
        else:
            model_file = hf_hub_download(
                repo_id=model_id,
                filename=constants.SAFETENSORS_SINGLE_FILE,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        safetensors.torch.load_model(model, model_file, strict=True, device=map_location)
        model.eval()
        return model
