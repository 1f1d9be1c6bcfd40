"""peft-qst: Quantized Side Tuning (Zhang et al., ACL 2024) as a tuner type of Hugging Face PEFT.

``import peft_qst`` registers the ``"QST"`` method with PEFT, after which `get_peft_model`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` handle QST
adapters like any built-in method. Importing it again is harmless.
"""

from .cache import QSTCache
from .compute_dtype import recommended_compute_dtype
from .config import DOWNSAMPLE_KINDS, PEFT_TYPE, QSTConfig
from .layer import QSTLayer
from .model import QSTModel
from .registration import register
from .serialization import QSTAdapterFileError
from .side import QSTSideNetwork, QSTUnsupportedModelError

__version__ = "0.1.0"

register()

__all__ = [
    "DOWNSAMPLE_KINDS",
    "PEFT_TYPE",
    "QSTAdapterFileError",
    "QSTCache",
    "QSTConfig",
    "QSTLayer",
    "QSTModel",
    "QSTSideNetwork",
    "QSTUnsupportedModelError",
    "recommended_compute_dtype",
    "register",
]
