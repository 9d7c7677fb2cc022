"""Every change this package makes to PEFT, in one place, for the PEFT versions it was checked against
(`peft_types.SUPPORTED_PEFT`; importing with another version is refused before anything is patched):

1. our PEFT types, spliced into PEFT's closed `PeftType` enum (`peft_types`, which the configs import);
2. our tuners registered with `register_peft_method`, so `get_peft_model`, `PeftConfig.from_pretrained`,
   `PeftModel.from_pretrained` and `load_adapter` dispatch to them;
3. `PeftModel.save_pretrained`, `create_or_update_model_card` and `_upload_modified_files` wrapped so routed
   adapters carry their routing statistics, heatmaps and model card (written by `hf_condroute.stats.hub`), and a save
   that would write an incomplete adapter under DeepSpeed ZeRO-3 is refused (`partitioned_save`).
"""

from __future__ import annotations

import functools
import inspect

from ..stats import hub
from .partitioned_save import check_adapter_tensors
from .peft_types import ROUTED_ADAPTER, ROUTED_FFN, ROUTED_LORA


def register_peft_types() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .routed_adapter import RoutedAdapterConfig, RoutedAdapterModel
    from .routed_ffn import RoutedFFNConfig, RoutedFFNModel
    from .routed_lora import RoutedLoraConfig, RoutedLoraModel

    if ROUTED_ADAPTER not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="routed_adapter", config_cls=RoutedAdapterConfig, model_cls=RoutedAdapterModel)
    if ROUTED_FFN not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="routed_ffn", config_cls=RoutedFFNConfig, model_cls=RoutedFFNModel)
    if ROUTED_LORA not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="routed_lora", config_cls=RoutedLoraConfig, model_cls=RoutedLoraModel)


def _wrap_save(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not hub.has_routing(self):
            return original(self, save_directory, *args, **kwargs)
        bound = signature.bind(self, save_directory, *args, **kwargs)
        bound.apply_defaults()
        selected, writes = bound.arguments["selected_adapters"], bound.arguments["is_main_process"]
        if writes:  # under DeepSpeed ZeRO-3: refuse before anything is written rather than write an empty adapter
            check_adapter_tensors(self, selected or list(self.peft_config), kwargs.get("state_dict"))
        result = original(self, save_directory, *args, **kwargs)
        if writes:
            hub.save_routing_stats(self, str(save_directory), selected)
        return result

    return save_pretrained


def _wrap_card(original):
    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir):
        result = original(self, output_dir)
        if hub.has_routing(self):
            hub.update_model_card(str(output_dir))
        return result

    return create_or_update_model_card


def _wrap_upload(original):
    # transformers' push_to_hub replaces README.md with the Hub's card just before uploading: put ours back in
    @functools.wraps(original)
    def _upload_modified_files(self, working_dir, *args, **kwargs):
        if hub.has_routing(self):
            hub.update_model_card(str(working_dir))
        return original(self, working_dir, *args, **kwargs)

    return _upload_modified_files


# PeftModel method -> its wrapper
PEFT_MODEL_WRAPPERS = {
    "save_pretrained": _wrap_save,
    "create_or_update_model_card": _wrap_card,
    "_upload_modified_files": _wrap_upload,
}


def install_peft_model_hooks() -> None:
    """Wrap PeftModel's save, card and upload methods (once) so routed adapters carry their statistics."""
    from peft import PeftModel

    for name, wrap in PEFT_MODEL_WRAPPERS.items():
        current = getattr(PeftModel, name)
        if getattr(current, "_hf_condroute_hook", False):
            continue
        wrapped = wrap(current)
        wrapped._hf_condroute_hook = True
        setattr(PeftModel, name, wrapped)


def apply_peft_patches() -> None:
    register_peft_types()
    install_peft_model_hooks()
