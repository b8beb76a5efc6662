"""The model card: hub_card.md (a Jinja template) rendered with the run's config and metrics."""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .model import AttrConfig

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "hub_card.md"


def render_card(config: AttrConfig, metrics: dict, train_config: dict) -> ModelCard:
    """The model card of a trained model, from hub_card.md."""
    validation = metrics["validation"]
    card_data = ModelCardData(
        library_name="attrclf",
        pipeline_tag="image-classification",
        tags=["image-classification", "multilabel", "attribute-classification", "timm", "attrclf", config.backbone],
        license="apache-2.0",
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        config=config,
        metrics=metrics,
        validation=validation,
        train_config=train_config,
        per_attribute=validation["per_attribute"],
        fmt=lambda v: "n/a" if v is None else f"{v:.3f}",
    )
