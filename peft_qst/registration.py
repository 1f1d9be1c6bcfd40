"""Registering "QST" with PEFT.

PEFT's own `register_peft_method` only accepts names that are already members of its closed `PeftType` enum, so an
out-of-tree method cannot use it. PEFT looks methods up by ``config.peft_type`` in four dicts; `PeftType` is a
``str`` enum, so the plain string ``"QST"`` works as a key alongside the enum members. There is no entry-point
discovery in PEFT: ``import peft_qst`` must run before an adapter is loaded.

One fix rides along: ``PeftModel.push_to_hub`` (transformers' ``PushToHubMixin``) saves the adapter, then overwrites
the model card PEFT just wrote with a generic transformers card (``library_name: transformers``, no base model) before
uploading. For models holding a QST adapter, the card is restored on the way to the upload: PEFT's fields
(``library_name: peft``, ``base_model``, tags) over whatever the push wrote, its tags kept, and QST's loading section.
"""

from __future__ import annotations

import os

from .card import add_usage_section
from .config import PEFT_TYPE, QSTConfig
from .model import QSTModel


def register() -> None:
    """Make "QST" resolvable by PEFT. Idempotent: a second call changes nothing."""
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = QSTConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = QSTModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = QSTModel.prefix
    _restore_model_card_on_push()


def _holds_qst_adapter(model) -> bool:
    return any(getattr(c, "peft_type", None) == PEFT_TYPE for c in (getattr(model, "peft_config", None) or {}).values())


def _restore_model_card_on_push() -> None:
    from huggingface_hub import ModelCard
    from peft import PeftModel

    original = PeftModel._upload_modified_files
    if getattr(original, "_restores_qst_card", False):
        return

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        card_path = os.path.join(working_dir, "README.md")
        if _holds_qst_adapter(self) and os.path.isfile(card_path):
            pushed_tags = list(ModelCard.load(card_path).data.tags or [])
            self.create_or_update_model_card(working_dir)
            card = ModelCard.load(card_path)
            card.data.tags = sorted(set(card.data.tags or []) | set(pushed_tags))
            card.save(card_path)
            add_usage_section(working_dir, self.active_peft_config.base_model_name_or_path)
        return original(self, working_dir, *args, **kwargs)

    _upload_modified_files._restores_qst_card = True
    PeftModel._upload_modified_files = _upload_modified_files
