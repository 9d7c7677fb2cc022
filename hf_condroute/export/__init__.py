"""Out of the package: routed models as native transformers MoE models (`to_native`, `save_native`) and routed LoRA
experts as ordinary PEFT LoRAs (`save_expert_loras`), loadable without hf_condroute and servable by inference engines.
`python -m hf_condroute.export ADAPTER_DIR --out DIR` does it from a saved adapter."""

from .api import to_native
from .checks import ExportError
from .loras import save_expert_loras
from .save import save_native

__all__ = ["ExportError", "save_expert_loras", "save_native", "to_native"]
