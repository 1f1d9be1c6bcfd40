"""Registering "QST" with PEFT.

PEFT's own `register_peft_method` only accepts names that are already members of its closed `PeftType` enum, so an
out-of-tree method cannot use it. PEFT looks methods up by ``config.peft_type`` in four dicts; `PeftType` is a
``str`` enum, so the plain string ``"QST"`` works as a key alongside the enum members. There is no entry-point
discovery in PEFT: ``import peft_qst`` must run before an adapter is loaded.
"""

from __future__ import annotations

from .config import PEFT_TYPE, QSTConfig
from .model import QSTModel


def register() -> None:
    """Make "QST" resolvable by PEFT. Idempotent: a second call changes nothing."""
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = QSTConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = QSTModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = QSTModel.prefix
