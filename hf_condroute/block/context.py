"""The routing context of a transformers model: what its routed blocks read in each forward, filled by hooks.

The context flows one way: the model's pre-hook starts one `RoutingStep` per forward and records the inputs;
routed layers read `inputs_for(...)`; the reading API (`hf_condroute.block.api`, statistics, callbacks) reads the step.
Nothing here depends on PEFT: the tuners install it, and so can any other model that routes.

A routed layer deep inside a model sees only its hidden states. What else routing needs, these hooks take
from the calls they see, so it works through `PeftModel.forward`, `generate` (beam search included),
`Trainer` and gradient checkpointing alike:

- the top-level model's pre-hook takes `routing_tags` and `routing_keys` off the kwargs (transformers models
  accept unknown kwargs silently), and records the attention mask, hash keys, labels and a new `RoutingStep`;
- for encoder-decoder models the encoder's hooks record its mask and the mean of its final hidden states, on
  which decoder blocks route (detached: under reentrant checkpointing a decoder layer's recomputation may only
  backpropagate into its explicit inputs), and the decoder's pre-hook records the decoder's mask and token ids;
- the top-level post-hook computes REINFORCE's reward and adds the auxiliary losses to `outputs.loss`.

State stays set until the next forward: gradient checkpointing recomputes blocks during backward.
The model's `forward` gets `routing_tags`/`routing_keys` in its signature, so `Trainer` keeps those dataset
columns and `generate` accepts them.
"""

from __future__ import annotations

import inspect
import types
import warnings

import torch
from torch import nn

from ..architectures import hidden_size, is_causal_lm
from ..routers import Router
from ..routers.hashing import content_keys
from .rewards import per_example_loss
from .routed_block import RoutingInputs, masked_mean
from .step import RoutingStep

ROUTING_KWARGS = ("routing_tags", "routing_keys")
_STATE_ATTR = "_condroute_state"


def _forward_with_routing_kwargs(self, *args, routing_tags=None, routing_keys=None, **kwargs):
    # the pre-hook already took the routing kwargs off; this method exists for its signature
    return type(self).forward(self, *args, **kwargs)


def _cache_in_use(kwargs: dict) -> bool:
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return False
    if torch.compiler.is_compiling():
        # traced: the cache's length is a tensor (reading it breaks the graph); a decoding step feeds one token
        ids = kwargs.get("input_ids")
        return ids is None or ids.shape[-1] == 1
    try:
        return cache.get_seq_length() > 0
    except (AttributeError, TypeError):
        return True


def warn_if_causal_example_routing(model: nn.Module, config) -> None:
    """Per-example routing pools over the whole sequence: in a causal LM that includes tokens a position must not
    see."""
    if is_causal_lm(model) and getattr(config, "routing_granularity", "token") == "example":
        warnings.warn(
            f"{type(model).__name__} is a causal language model, but routing_granularity='example' routes every "
            "position on the mean of the whole sequence, future tokens included. Use routing_granularity='token' "
            "for causal language models.",
            stacklevel=3,
        )


BATCH_SOURCES = ("input_ids", "inputs_embeds", "pixel_values", "decoder_input_ids", "decoder_inputs_embeds")


def _batch_size(kwargs: dict) -> tuple[int | None, str]:
    """The number of examples of a forward and the argument it was read from."""
    for name in BATCH_SOURCES:
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0], name
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        hidden = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs.last_hidden_state
        return hidden.shape[0], "encoder_outputs"
    return None, ""


def token_mask(mask) -> torch.Tensor | None:
    """The (batch, length) mask routing reads, from the attention mask a forward got: a 2-D padding mask as it is;
    a 4-D one (batch, heads, queries, keys), which transformers builds itself for static and sliding caches, as
    whether each query attends to any key (a padding query attends to none). Boolean 4-D masks mark attended keys
    True, additive float ones 0 (masked: -inf or the dtype's minimum). Anything else (a flex-attention BlockMask)
    carries no padding routing can read: None, every token routed."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return mask if isinstance(mask, torch.Tensor) else None
    if mask.dtype == torch.bool:
        attended = mask[:, 0]
    elif mask.is_floating_point():
        attended = mask[:, 0] > torch.finfo(mask.dtype).min / 2
    else:
        attended = mask[:, 0] != 0
    return attended.any(dim=-1)


class ModelRoutingState:
    """Shared by every routed layer of one model. Use `ModelRoutingState.of(model)` to get or install it."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = getattr(model, "config", None)
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.step: RoutingStep | None = None
        self.tags: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None  # routing_keys as given, else the input-id content of each example
        self.keys_explicit = False
        self.labels: torch.Tensor | None = None
        self.masks: dict[str, torch.Tensor | None] = {"self": None, "encoder": None, "decoder": None}
        self._masks_full: dict[str, tuple] = {}  # side -> (its mask, whether the mask is all ones), once per mask
        self.token_ids: dict[str, torch.Tensor | None] = {"self": None, "encoder": None, "decoder": None}
        self.encoder_pooled: torch.Tensor | None = None
        self._inside_forward = False
        self._signature = inspect.signature(type(model).forward)
        self._handles: list = []
        self.decoder_prefix: str | None = None
        self.encoder_hidden_size: int | None = None
        self._install()

    # ----- set-up -----------------------------------------------------------------------------------
    @classmethod
    def of(cls, model: nn.Module) -> ModelRoutingState:
        state = model.__dict__.get(_STATE_ATTR)
        if state is None:
            state = cls(model)
            model.__dict__[_STATE_ATTR] = state
        return state

    @classmethod
    def find(cls, model: nn.Module) -> ModelRoutingState | None:
        for module in model.modules():
            state = module.__dict__.get(_STATE_ATTR)
            if state is not None:
                return state
        return None

    def _install(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True))
        if self.is_encoder_decoder:
            encoder, decoder = model.get_encoder(), model.get_decoder()
            names = {id(m): n for n, m in model.named_modules()}
            self.decoder_prefix = names.get(id(decoder))
            self._handles.append(encoder.register_forward_pre_hook(self._pre_encoder, with_kwargs=True))
            self._handles.append(encoder.register_forward_hook(self._post_encoder, with_kwargs=True))
            self._handles.append(decoder.register_forward_pre_hook(self._pre_decoder, with_kwargs=True))
            self.encoder_hidden_size = hidden_size(model.config)
        if "forward" not in model.__dict__:
            method = types.FunctionType(
                _forward_with_routing_kwargs.__code__, _forward_with_routing_kwargs.__globals__, "forward"
            )
            method.__kwdefaults__ = dict.fromkeys(ROUTING_KWARGS)
            params = [p for p in self._signature.parameters.values() if p.kind != p.VAR_KEYWORD]
            var_kw = [p for p in self._signature.parameters.values() if p.kind == p.VAR_KEYWORD]
            extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ROUTING_KWARGS]
            method.__signature__ = self._signature.replace(parameters=params + extra + var_kw)
            method.__doc__ = type(model).forward.__doc__
            model.forward = types.MethodType(method, model)

    def remove(self) -> None:
        """Take every hook and the forward signature patch off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        forward = self.model.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__.__code__ is _forward_with_routing_kwargs.__code__:
            del self.model.__dict__["forward"]
        self.model.__dict__.pop(_STATE_ATTR, None)

    def side_of(self, module_name: str) -> str:
        """'decoder' or 'encoder' in encoder-decoder models, else 'self'."""
        if not self.is_encoder_decoder:
            return "self"
        prefix = self.decoder_prefix
        if prefix is not None and (module_name == prefix or module_name.startswith(prefix + ".")):
            return "decoder"
        return "encoder"

    # ----- what a routed layer gets ----------------------------------------------------------------
    def inputs_for(self, side: str, granularity: str) -> RoutingInputs:
        pooled = None
        if side == "decoder" and granularity == "example":
            if self.encoder_pooled is None:
                raise ValueError(
                    "A decoder block routes on the mean of the encoder's output, but the encoder has not run in this "
                    "forward. Pass `input_ids` (or `encoder_outputs` together with `attention_mask`)."
                )
            pooled = self.encoder_pooled
        key_side = "encoder" if side == "decoder" and granularity == "example" else side
        if granularity == "example":
            keys = self.keys
        else:  # a user's (batch, tokens) keys replace the token ids of the input they came with, not the decoder's
            keys = self.keys if self.keys_explicit and side != "decoder" else None
        return RoutingInputs(
            mask=self.masks[side],
            mask_full=self._mask_full(side),
            pooled=pooled,
            tags=self.tags,
            keys=keys,
            token_ids=self.token_ids[key_side],
            step=self.step,
        )

    def _set_mask(self, side: str, mask: torch.Tensor | None) -> None:
        # no write to `_masks_full` here: traced, a guard on its keys would recompile whenever an eager call left an
        # entry behind; its entries name the mask they were computed for instead
        self.masks[side] = token_mask(mask)

    def _mask_full(self, side: str) -> bool | None:
        """Whether `side`'s whole mask is ones, checked once per mask set by a forward, not in every block: a host
        sync per layer otherwise, and a few ops per layer and token in decoding."""
        mask = self.masks[side]
        if mask is None or torch.compiler.is_compiling():  # traced: blocks handle padding with fixed shapes
            return None
        cached = self._masks_full.get(side)
        if cached is None or cached[0] is not mask:
            cached = self._masks_full[side] = (mask, bool(mask.all()))
        return cached[1]

    # ----- hooks ------------------------------------------------------------------------------------
    def _take_routing_kwargs(self, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        tags, keys = kwargs.pop("routing_tags", None), kwargs.pop("routing_keys", None)
        if tags is not None and not isinstance(tags, torch.Tensor):
            tags = torch.as_tensor(tags)
        if keys is not None and not isinstance(keys, torch.Tensor):
            keys = torch.as_tensor(keys)
        return tags, keys

    @staticmethod
    def _check_rows(tags, keys, kwargs: dict, where: str) -> None:
        """routing_tags and routing_keys need one row per example of the batch: a short tensor is refused, never
        repeated (generate repeats them for beams itself)."""
        batch, source = _batch_size(kwargs)
        for name, t in (("routing_tags", tags), ("routing_keys", keys)):
            if t is None:
                continue
            if t.dim() == 0:
                raise ValueError(
                    f"{name} is a single number, but it needs one row per example: pass a tensor of shape (batch,)"
                    + (
                        " or (batch, tokens) for per-token routing."
                        if name == "routing_keys"
                        else " or (batch, groups)."
                    )
                )
            if batch is not None and t.shape[0] != batch:
                raise ValueError(
                    f"{name} has {t.shape[0]} rows but the batch has {batch} examples ({source} of {where}): give "
                    f"one row per example, in the batch's order."
                )

    def _check_tag_columns(self, tags, kwargs: dict) -> None:
        """(batch, groups) tags hold one tag per example for each tag group (a block reads column `tag_group`).
        Tags given per token by mistake, (batch, sequence length), would be read as that many groups, each block
        using one column: refused when their width is the sequence length and no block reads past the first
        columns. Only that rare shape walks the model."""
        if tags is None or tags.dim() != 2 or tags.shape[1] < 2:
            return
        ids = next(
            (kwargs[n] for n in ("input_ids", "attention_mask") if isinstance(kwargs.get(n), torch.Tensor)), None
        )
        if ids is None or ids.dim() != 2 or ids.shape[1] != tags.shape[1]:
            return
        groups = 1 + max((m.config.tag_group for m in self.model.modules() if isinstance(m, Router)), default=0)
        if groups < tags.shape[1]:
            raise ValueError(
                f"routing_tags has shape {tuple(tags.shape)}, one column per token of the input, but tags are per "
                f"example: (batch,) with one tag per example, or (batch, groups) with one tag per example for each "
                f"tag group (the routed blocks here read {groups} group(s), `tag_group` 0..{groups - 1}). Give each "
                "example one tag (e.g. routing_tags[:, 0]): tags cannot be given per token."
            )

    def _set_keys(self, explicit, input_ids, attention_mask, continuing: bool) -> None:
        if explicit is not None:
            self.keys, self.keys_explicit = explicit.long(), True
        elif not continuing:
            self.keys = content_keys(input_ids, attention_mask) if input_ids is not None else None
            self.keys_explicit = False

    def _pre_forward(self, module, args, kwargs):
        if args:
            bound = self._signature.bind_partial(module, *args, **kwargs)
            own = next(iter(self._signature.parameters))  # the module's own parameter, whatever its name
            kwargs = {k: v for k, v in bound.arguments.items() if k != own}
            kwargs.update(kwargs.pop("kwargs", {}) or {})
            args = ()
        tags, keys = self._take_routing_kwargs(kwargs)
        self._check_rows(tags, keys, kwargs, "the model's forward")
        self._check_tag_columns(tags, kwargs)
        self.step = RoutingStep()
        self._inside_forward = True
        encoder_outputs = kwargs.get("encoder_outputs")
        continuing = _cache_in_use(kwargs) or encoder_outputs is not None
        self.tags = tags
        input_ids, mask = kwargs.get("input_ids"), token_mask(kwargs.get("attention_mask"))
        self._set_keys(keys, input_ids, mask, continuing)
        self.labels = kwargs.get("labels")
        if self.is_encoder_decoder:
            if input_ids is not None or encoder_outputs is not None:
                self._set_mask("encoder", mask)
            if input_ids is not None:
                self.token_ids["encoder"] = input_ids
            self._set_mask("decoder", kwargs.get("decoder_attention_mask"))
            self.token_ids["decoder"] = kwargs.get("decoder_input_ids")
            if encoder_outputs is not None:
                hidden = (
                    encoder_outputs[0]
                    if isinstance(encoder_outputs, (tuple, list))
                    else encoder_outputs.last_hidden_state
                )
                self.encoder_pooled = masked_mean(hidden.detach(), mask)
        else:
            self._set_mask("self", mask)
            self.token_ids["self"] = input_ids
        return args, kwargs

    def _post_forward(self, module, args, kwargs, output):
        self._inside_forward = False
        step = self.step
        if step is None or not step.records or not module.training or not torch.is_grad_enabled():
            return output
        logits = getattr(output, "logits", None)
        if step.needs_reward and self.labels is not None and logits is not None:
            step.set_reward(per_example_loss(logits, self.labels, module))
        loss = getattr(output, "loss", None)
        if loss is not None:
            output.loss = step.add_to_loss(loss)
        return output

    def _pre_encoder(self, module, args, kwargs):
        tags, keys = self._take_routing_kwargs(kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = token_mask(kwargs.get("attention_mask", args[1] if len(args) > 1 else None))
        if not self._inside_forward:
            # the encoder runs on its own (as in generate): a new forward
            self._check_rows(tags, keys, {"input_ids": input_ids, **kwargs}, "the encoder")
            self._check_tag_columns(tags, {"input_ids": input_ids, **kwargs})
            self.step = RoutingStep()
            self.tags = tags
            self._set_keys(keys, input_ids, mask, continuing=False)
        elif tags is not None:
            self.tags = tags
        self._set_mask("encoder", mask)
        self.token_ids["encoder"] = input_ids
        return args, kwargs

    def _post_encoder(self, module, args, kwargs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
        self.encoder_pooled = masked_mean(hidden.detach(), self.masks["encoder"])
        return output

    def _pre_decoder(self, module, args, kwargs):
        self._take_routing_kwargs(kwargs)
        self._set_mask("decoder", kwargs.get("attention_mask", args[1] if len(args) > 1 else None))
        self.token_ids["decoder"] = kwargs.get("input_ids", args[0] if args else None)
        return args, kwargs
