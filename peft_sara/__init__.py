"""SaRA (Progressive Sparse Low-Rank Adaptation, ICLR 2025) as a PEFT method for diffusers and transformers models.

Importing this package registers the PEFT type "SARA" (parameter prefix `sara_`), so that `get_peft_model`,
`PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and diffusers' `add_adapter` accept SaRA adapters.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import SaRAConfig
from .export import LayerExport, LoraExport, export_lora
from .layer import Conv2d, Linear, SaRALayer
from .loading import load_sara_weights
from .model import SaRAModel
from .peft_type import SARA
from .training import SaRATraining, attach, paper_learning_rate

__version__ = "0.1.0"
__all__ = [
    "SARA",
    "Conv2d",
    "LayerExport",
    "Linear",
    "LoraExport",
    "SaRAConfig",
    "SaRALayer",
    "SaRAModel",
    "SaRATraining",
    "attach",
    "export_lora",
    "load_sara_weights",
    "paper_learning_rate",
]

if SARA not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="sara", config_cls=SaRAConfig, model_cls=SaRAModel, prefix="sara_")
