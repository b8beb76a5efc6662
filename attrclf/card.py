"""The model card: hub_card.md rendered from a run's config.json, metrics.json and train_config.json (no network).

`render_card` fills the template that ships inside the package (attrclf/hub_card.md in a wheel), or the checkout's
top-level hub_card.md. hub.py pushes what this renders; training and save_pretrained write it as README.md.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import __version__

CARD_IMAGES = ("loss_curve.png", "pr_curves.png")
CHECKOUT_TEMPLATE = Path(__file__).resolve().parent.parent / "hub_card.md"
LOSS_NAMES = {"bce": "binary cross-entropy with logits", "asl": "asymmetric loss (ASL)"}
RARE = 0.10  # an attribute with fewer known training positives than this is called rare in the card
FEW_VALIDATION_POSITIVES = 30
MANY_NA = 0.20


def card_template() -> str:
    """hub_card.md's text: the copy inside the installed package, else the checkout's top-level one."""
    packaged = resources.files("attrclf") / "hub_card.md"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return CHECKOUT_TEMPLATE.read_text(encoding="utf-8")


def render_card(config: dict, metrics: dict | None = None, train_config: dict | None = None,
                repo_id: str | None = None, *, images: tuple[str, ...] = CARD_IMAGES) -> ModelCard:
    """The model card from hub_card.md; it names the attrclf version that saved the model (config.json).

    Args:
        config: The model's config.json content.
        metrics: metrics.json content; None for a model saved outside training (the card then says so).
        train_config: train_config.json content.
        repo_id: Hub id the usage lines name (default: the run's --push-to-hub).
        images: PNGs beside the card that it shows.
    """
    train_config = train_config or {}
    repo_id = repo_id or train_config.get("push_to_hub")
    return ModelCard.from_template(
        card_data(config, metrics, train_config, repo_id),
        template_str=card_template(),
        config=config,
        attrclf_version=config.get("attrclf_version") or __version__,
        metrics=metrics,
        train=train_config,
        model_ref=repo_id or "PATH_OR_REPO_ID",
        rows=attribute_rows(config, metrics),
        backbone_origin=backbone_origin(train_config),
        loss_name=LOSS_NAMES.get(train_config.get("loss"), train_config.get("loss")),
        head=head_description(config),
        na_summary=na_summary(train_config),
        threshold_summary=threshold_summary(metrics),
        na_procedure=na_procedure(train_config),
        limitations=limitations(metrics, train_config) if metrics else [],
        images=images,
        fmt=lambda v: "n/a" if v is None else f"{v:.3f}",
    )


def card_data(config: dict, metrics: dict | None, train_config: dict, repo_id: str | None) -> ModelCardData:
    """The card's YAML metadata: library, task, tags, license, base model, datasets and the model-index."""
    dataset_id = train_config.get("dataset_id")
    results = eval_results(metrics, train_config)
    return ModelCardData(
        library_name="attrclf",
        pipeline_tag="image-classification",
        license=train_config.get("license"),
        tags=["attrclf", "image-classification", "multilabel", "attribute-classification", "timm",
              config["backbone"], "model_hub_mixin", "pytorch_model_hub_mixin"],
        base_model=base_model_id(train_config),
        datasets=[dataset_id] if dataset_id else None,
        model_name=(repo_id or f"attrclf-{config['backbone']}").split("/")[-1] if results else None,
        eval_results=results or None,
    )


def eval_results(metrics: dict | None, train_config: dict) -> list[EvalResult]:
    """The model-index entries: validation mAP and macro-F1 (at 0.5, tuned, tuned on held-out halves)."""
    validation = (metrics or {}).get("validation", {})
    if validation.get("mAP") is None:
        return []
    if train_config.get("dataset_id"):
        dataset_type = dataset_name = train_config["dataset_id"]
    elif train_config.get("data"):
        dataset_type, dataset_name = "custom", Path(train_config["data"]).name
    else:
        dataset_type, dataset_name = "attrclf-demo", "attrclf demo (generated shapes)"
    figures = [
        ("mAP", "mAP over known labels", validation["mAP"]),
        ("f1", "macro-F1 at threshold 0.5", validation["f1_macro_at_0.5"]),
        ("f1", "macro-F1 at thresholds tuned on this split (optimistic)", validation["f1_macro_tuned"]),
        ("f1", "macro-F1, thresholds tuned and scored on different halves", validation["f1_macro_tuned_crossfit"]),
    ]
    return [
        EvalResult(task_type="image-classification", task_name="Multilabel attribute classification",
                   dataset_type=dataset_type, dataset_name=dataset_name, dataset_split="validation",
                   metric_type=kind, metric_name=name, metric_value=round(value, 4))
        for kind, name, value in figures if value is not None
    ]


def base_model_id(train_config: dict) -> str | None:
    """The Hub id of the backbone weights training started from: only timm's own download can be named."""
    if not train_config.get("pretrained") or train_config.get("backbone_weights"):
        return None
    import timm  # only here: naming the weights needs timm's registry, which imports torch

    pretrained_cfg = timm.models.get_pretrained_cfg(train_config["backbone"])
    return pretrained_cfg.hf_hub_id if pretrained_cfg and pretrained_cfg.hf_hub_id else None


def backbone_origin(train_config: dict) -> str:
    """Where the backbone's starting weights came from, in words for the card."""
    if not train_config:
        return "unknown (the model was saved outside an attrclf training run)"
    if train_config.get("backbone_weights"):
        return f"pretrained weights from the local file `{Path(train_config['backbone_weights']).name}`"
    if train_config.get("pretrained"):
        hub_id = base_model_id(train_config)
        if hub_id:
            return f"pretrained weights [`{hub_id}`](https://huggingface.co/{hub_id})"
        return "timm's pretrained weights"
    return "random initial weights (trained from scratch)"


def head_description(config: dict) -> str:
    """The head, in words for the card (a config.json without head_type has the MLP head)."""
    num_labels = len(config["label_names"])
    if config.get("head_type", "mlp") == "query":
        return (f"attribute queries (`--head query`): one learned {config['query_dim']}-wide query per attribute, "
                f"{config['query_layers']} decoder layer(s) in which the queries attend to each other and, with "
                f"{config['query_heads']} attention heads, to every position of the backbone's unpooled feature map "
                f"(dropout {config['query_dropout']}); each query's output gives its own attribute's logit")
    hidden = (f" - Linear({config['head_hidden']}) - ReLU - Dropout({config['hidden_dropout']})"
              if config["head_hidden"] else "")
    return (f"BatchNorm1d - Dropout({config['head_dropout']}){hidden} - Linear({num_labels}) on the pooled "
            f"features (`--head mlp`)")


def threshold_summary(metrics: dict | None) -> str:
    """How the card's thresholds were tuned (metrics.json "threshold_rule"; runs before it had one used max-f1)."""
    if (metrics or {}).get("threshold_rule", "max-f1") == "half-f1":
        return ("Each attribute's threshold is half the best F1 it reached on the validation split, read as a "
                "probability with the loss's positive weight taken out: the F1-optimal threshold of calibrated "
                "probabilities (Lipton et al., 2014), steadier than the exact peak when an attribute has few "
                "positives.")
    return "Thresholds were tuned per attribute to maximise F1 on the validation split."


def na_summary(train_config: dict) -> str:
    """What training did with NA labels, in one sentence for the card's opening (--na-policy)."""
    policy = train_config.get("na_policy", "ignore")
    if policy == "negative":
        return ("NA entries counted as absent (0) in the training loss (`--na-policy negative`) and the positive "
                "weights counted them as negatives; they never entered the metrics or the threshold search.")
    if policy == "pseudo":
        return ("NA entries never entered the metrics or the threshold search and the positive weights were counted "
                "over known labels only; in the training loss, from the first fine-tuning epoch on, the NA entries "
                "the model itself predicted most confidently served as down-weighted pseudo-labels "
                "(`--na-policy pseudo`, see the training procedure).")
    if policy == "selective":
        return ("NA entries never entered the metrics or the threshold search and the positive weights were counted "
                "over known labels only; in the training loss, an NA entry of a rare attribute that the model did "
                "not find likely counted as a down-weighted negative (`--na-policy selective`, see the training "
                "procedure).")
    if policy == "teacher":
        return ("NA entries never entered the metrics or the threshold search and the positive weights were counted "
                "over known labels only; in the training loss, each NA entry took the weight average's (a mean "
                "teacher's) probability as a soft target, weighted by how certain it was (`--na-policy teacher`, "
                "see the training procedure).")
    if policy == "fixmatch":
        return ("NA entries never entered the metrics or the threshold search and the positive weights were counted "
                "over known labels only; in the training loss, from the first fine-tuning epoch on, an NA entry the "
                "model was sure of on the training view of an image became a pseudo-label learnt on a stronger view "
                "of the same image (`--na-policy fixmatch`, see the training procedure).")
    return ("NA entries never entered the loss (they are masked out of the mean and the gradients), the metrics or "
            "the threshold search, and the positive weights were counted over known labels only.")


def na_procedure(train_config: dict) -> str:
    """The training procedure's line on NA labels (--na-policy and, for pseudo, its settings)."""
    policy = train_config.get("na_policy", "ignore")
    if policy == "pseudo":
        low, high = train_config.get("pseudo_low", 0.05), train_config.get("pseudo_high", 0.95)
        return (f"`--na-policy pseudo`, curriculum pseudo-labelling (Durand et al., CVPR 2019): NA entries left "
                f"out of the loss in the head stage; from the first fine-tuning epoch on, an NA entry of a training "
                f"batch whose predicted probability (with pos_weight taken out) was at most {low:g} became a "
                f"pseudo-negative and at least "
                f"{high:g} a pseudo-positive, with loss weight {train_config.get('pseudo_weight', 0.5):g} (known "
                f"labels 1); the thresholds started strict and relaxed linearly to these values over the "
                f"fine-tuning epochs. Validation, the best epoch, the thresholds and every count saw real labels only")
    if policy == "selective":
        return (f"`--na-policy selective`, selective negatives after CSL (Ben-Baruch et al., CVPR 2022): in every "
                f"epoch, an NA entry of a training batch counted as a negative with loss weight "
                f"{train_config.get('selective_weight', 0.5):g} (known labels 1) when its attribute's positive share "
                f"among the known training labels was at most {train_config.get('selective_max_prior', 0.3):g} and "
                f"the model's probability for it below {train_config.get('selective_likely', 0.5):g}; every other "
                f"NA entry stayed out of the loss. Validation, the best epoch, the thresholds and every count saw "
                f"real labels only")
    if policy == "teacher":
        return (f"`--na-policy teacher`, a mean teacher (Tarvainen & Valpola, NeurIPS 2017) for the NA entries: in "
                f"every step the exponential moving average of the weights ran on the same training batch and each "
                f"NA entry took its probability p as a soft target (corrected for the positive weight), with loss "
                f"weight {train_config.get('teacher_weight', 0.5):g} x |2p - 1| (known labels 1). Validation, the "
                f"best epoch, the thresholds and every count saw real labels only")
    if policy == "fixmatch":
        from .device_augment import STRONG_CROP_SCALE, STRONG_JITTER  # torch only when a card has this line

        threshold = train_config.get("fixmatch_threshold", 0.95)
        negatives = (f" and at most {1 - threshold:.2g} a pseudo-negative"
                     if train_config.get("fixmatch_negatives", False) else " (no pseudo-negatives)")
        weighed = ("" if train_config.get("fixmatch_pos_weight", False)
                   else ", each weighing 1 (the positive weight left out)")
        return (f"`--na-policy fixmatch`, FixMatch (Sohn et al., NeurIPS 2020) entry by entry: NA entries left out of "
                f"the loss in the head stage; from the first fine-tuning epoch on, each training batch also went "
                f"through the model as a stronger view (a random resized crop keeping at least "
                f"{STRONG_CROP_SCALE:.0%} of the image, colour jitter "
                f"{train_config.get('fixmatch_jitter', STRONG_JITTER):g}, no erasing), and an NA entry whose "
                f"probability on the usual view (with pos_weight taken out) was at least {threshold:g} became a "
                f"pseudo-positive{negatives} on the strong view{weighed}; their loss, over the batch's NA entries, "
                f"was added with weight {train_config.get('fixmatch_weight', 1.0):g} to the known labels' mean. "
                f"Validation, the best epoch, the thresholds and every count saw real labels only")
    if policy == "negative":
        return "`--na-policy negative`: NA counted as absent (0) in the training loss"
    return "`--na-policy ignore`: NA left out of the loss"


def attribute_rows(config: dict, metrics: dict | None) -> list[dict]:
    """One dict per attribute: name and threshold, and with metrics its counts, pos_weight and validation scores."""
    rows = []
    for name, threshold in zip(config["label_names"], config["thresholds"], strict=True):
        row = {"name": name, "threshold": threshold}
        if metrics:
            row.update(train=metrics["data"]["train_counts"][name],
                       validation=metrics["data"]["validation_counts"][name],
                       pos_weight=metrics["pos_weight"][name], **metrics["validation"]["per_attribute"][name])
        rows.append(row)
    return rows


def limitations(metrics: dict, train_config: dict) -> list[str]:
    """The limitations section, from the run's own numbers."""
    validation, data = metrics["validation"], metrics["data"]
    notes = []
    if not train_config.get("data"):
        notes.append("Trained on attrclf's generated demo shapes: it shows the pipeline works and says nothing about "
                     "real photographs.")
    notes.append(f"Every score here comes from {validation['num_images']} validation images drawn from the same source "
                 f"as the training images; expect lower scores on images unlike them.")
    rare, few, many_na, single = [], [], [], []
    for name, row in validation["per_attribute"].items():
        counts = data["train_counts"][name]
        known = counts["positive"] + counts["negative"]
        if known + counts["na"] and counts["na"] / (known + counts["na"]) > MANY_NA:
            many_na.append(f"`{name}` ({counts['na'] / (known + counts['na']):.0%})")
        if not row["evaluated"]:
            single.append(f"`{name}`")
        elif known and counts["positive"] / known < RARE:
            rare.append(f"`{name}`: {counts['positive']} positives among {known} known training labels "
                        f"({counts['positive'] / known:.0%}); AP {row['ap']:.3f} against the mAP of "
                        f"{validation['mAP']:.3f}, measured on only {row['positives']} validation positives")
        elif row["positives"] < FEW_VALIDATION_POSITIVES:
            few.append(f"`{name}` ({row['positives']})")
    if rare:
        notes.append("Rare in training: " + "; ".join(rare) + ".")
    if few:
        notes.append(f"Few validation positives for {', '.join(few)}: their scores would move noticeably with a few "
                     f"images more or less.")
    if many_na:
        notes.append(f"Often unknown (NA) among the training labels, so learnt from fewer examples: "
                     f"{', '.join(many_na)}.")
    if single:
        notes.append(f"{', '.join(single)}: a single class among the known validation labels, so no AP or F1 could "
                     f"be measured.")
    return notes + run_notes(metrics, train_config) + [
        "Attributes are predicted independently: nothing checks that the predicted set is consistent."]


def run_notes(metrics: dict, train_config: dict) -> list[str]:
    """Limitations that come from how the run went: thresholds, pos_weight caps, skipped images, its length."""
    validation, notes = metrics["validation"], []
    if validation["f1_macro_tuned"] is not None and validation["f1_macro_tuned_crossfit"] is not None:
        notes.append(f"Thresholds were tuned on the validation images the table reports (macro-F1 "
                     f"{validation['f1_macro_tuned']:.3f} there); tuned on one half and scored on the other they give "
                     f"{validation['f1_macro_tuned_crossfit']:.3f}, the better guess for new images.")
    cap = train_config.get("pos_weight_cap", float("inf"))
    capped = [name for name, w in metrics["pos_weight"].items() if w >= cap]
    if capped:
        notes.append(f"pos_weight reached its cap ({cap:g}) for {', '.join(capped)}: "
                     f"a positive of these weighs {cap:g} times a negative, less than "
                     f"negatives / positives would give (--pos-weight-cap).")
    if metrics["data"]["skipped_images"]:
        notes.append(f"{metrics['data']['skipped_images']} unreadable image(s) were skipped; they are listed in "
                     f"metrics.json.")
    if train_config.get("max_steps"):
        notes.append(f"A short run (stopped at --max-steps {train_config['max_steps']}): not a finished model.")
    elif metrics["best_epoch"] == metrics["epochs_run"] == train_config.get("epochs") and not metrics["stopped_early"]:
        # (a run that stopped improving and annealed into its last allowed epoch was not still rising)
        notes.append(f"The best epoch was the last of the {metrics['epochs_run']} allowed: validation mAP was still "
                     f"rising, so a longer run (--epochs) would likely do better.")
    return notes
