"""The UniFilter model: configs, the quality classifier, checkpoint I/O (released layout) and presets.

Importing this package registers both model types (``llava_qwen``, ``llava_qwen3``) with ``AutoConfig``,
``AutoModel`` and ``AutoModelForSequenceClassification`` (importing the model module registers the released
key layout with transformers' weight-conversion mapping).
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from unifilter_core.modeling.configuration_unifilter import (
    IMAGE_TOKEN_INDEX,
    UniFilterConfig,
    UniFilterQwen3Config,
    check_special_ids,
    config_class_for,
    load_checkpoint_config,
    read_config_json,
)
from unifilter_core.modeling.init import init_checkpoint, tokenizer_facts
from unifilter_core.modeling.modeling_unifilter import (
    QualityScoringOutput,
    UniFilterForQualityScoring,
    UniFilterQwen3ForQualityScoring,
    scores_from_logits,
)
from unifilter_core.modeling.presets import KNOWN_VISION_TOWERS, available_presets, load_preset


def _register() -> None:
    for config_cls, model_cls in (
        (UniFilterConfig, UniFilterForQualityScoring),
        (UniFilterQwen3Config, UniFilterQwen3ForQualityScoring),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForSequenceClassification.register(config_cls, model_cls, exist_ok=True)


_register()

__all__ = [
    "IMAGE_TOKEN_INDEX",
    "KNOWN_VISION_TOWERS",
    "QualityScoringOutput",
    "UniFilterConfig",
    "UniFilterForQualityScoring",
    "UniFilterQwen3Config",
    "UniFilterQwen3ForQualityScoring",
    "available_presets",
    "check_special_ids",
    "config_class_for",
    "init_checkpoint",
    "load_checkpoint_config",
    "load_preset",
    "read_config_json",
    "scores_from_logits",
    "tokenizer_facts",
]
