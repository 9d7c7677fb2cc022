"""Every field of the routing config and of the tuner configs is checked when the config is built, with an error
that names the field: one case per rule, generated from the rule each field declares, plus the cases users hit."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from hf_condroute import RoutedAdapterConfig, RoutedFFNConfig, RoutedLoraConfig
from hf_condroute.routers.config import RoutingConfig
from hf_condroute.routers.validation import (
    Choice,
    ConfigError,
    ConfigTypeError,
    ExpertList,
    Flag,
    Number,
    PatternMap,
    Text,
)

CONFIGS = {
    "RoutedAdapterConfig": lambda **kw: RoutedAdapterConfig(**kw),
    "RoutedFFNConfig": lambda **kw: RoutedFFNConfig(init_weights=kw.pop("init_weights", False), **kw),
    "RoutedLoraConfig": lambda **kw: RoutedLoraConfig(**kw),
}
CLASSES = {
    "RoutedAdapterConfig": RoutedAdapterConfig,
    "RoutedFFNConfig": RoutedFFNConfig,
    "RoutedLoraConfig": RoutedLoraConfig,
}
# fields whose values are checked elsewhere (the router registry) or that are PEFT's own
UNRULED = {"router", "target_modules", "exclude_modules", "modules_to_save", "importance"}


def bad_values(rule):
    """(value, error class) pairs that break `rule`."""
    cases = []
    if isinstance(rule, Number):
        cases.append(("3", ConfigTypeError))
        cases.append((True, ConfigTypeError))
        if rule.integer:
            cases.append((1.5, ConfigTypeError))
        else:
            cases.append((math.nan, ConfigError))
        if rule.low is not None:
            cases.append((rule.low if rule.low_open else rule.low - 1, ConfigError))
        if rule.high is not None:
            cases.append((rule.high if rule.high_open else rule.high + 1, ConfigError))
    elif isinstance(rule, Flag):
        cases += [("yes", ConfigTypeError), (1, ConfigTypeError)]
    elif isinstance(rule, Choice):
        cases += [("no-such-value", ConfigError)]
    elif isinstance(rule, Text):
        cases += [(3, ConfigTypeError)] + ([(["dense", 4], ConfigTypeError)] if rule.many else [])
    elif isinstance(rule, ExpertList):
        cases += [([], ConfigTypeError), ([0, "1"], ConfigTypeError)]
    elif isinstance(rule, PatternMap):
        cases += [([0], ConfigTypeError), ({"(": [0]}, ConfigError), ({"enc": "0"}, ConfigTypeError)]
    if not rule.optional:
        cases.append((None, ConfigTypeError))
    assert cases, f"no bad values for {rule}"
    return cases


def rule_cases():
    for cls_name, cls in CLASSES.items():
        for f in fields(cls):
            rule = f.metadata.get("check")
            if rule is None:
                continue
            for value, error in bad_values(rule):
                yield pytest.param(cls_name, f.name, value, error, id=f"{cls_name}.{f.name}={value!r}")


@pytest.mark.parametrize("config, name, value, error", list(rule_cases()))
def test_each_rule_refuses_a_bad_value_and_names_the_field(config, name, value, error):
    with pytest.raises(error, match=rf"{config}\.{name}\b.* must be .*got "):
        CONFIGS[config](**{name: value})


@pytest.mark.parametrize("config", list(CLASSES))
def test_every_field_has_a_rule(config):
    peft_fields = {f.name for f in fields(CLASSES[config]) if f.name not in {g.name for g in fields(RoutingConfig)}}
    ours = {f.name for f in fields(RoutingConfig)} | {
        n
        for n in peft_fields
        if n
        in {
            "adapter_dim",
            "adapter_activation",
            "init_weights",
            "expert_dim",
            "shared_neurons",
            "ffn_in_proj",
            "ffn_out_proj",
            "ffn_activation",
            "ffn_dropout",
            "r",
            "lora_alpha",
            "lora_dropout",
            "init_lora_weights",
            "router_sharing",
            "lora_experts",
        }
    }
    missing = [f.name for f in fields(CLASSES[config]) if f.name in ours - UNRULED and "check" not in f.metadata]
    assert not missing, f"fields without a validation rule: {missing}"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_experts="8"), TypeError, r"num_experts must be >= 1 \(an integer\)( or None)?, got '8'"),
        (dict(xmoe_temperature=0), ValueError, "xmoe_temperature must be > 0"),
        (dict(xmoe_dim=0), ValueError, "xmoe_dim must be >= 1"),
        (dict(router_jitter_noise=1.0), ValueError, r"router_jitter_noise must be in \[0, 1\)"),
        (dict(router_jitter_noise=-0.1), ValueError, r"router_jitter_noise must be in \[0, 1\)"),
        (dict(reinforce_entropy_coef=-1e-3), ValueError, "reinforce_entropy_coef must be >= 0"),
        (dict(reinforce_policy_coef=-1), ValueError, "reinforce_policy_coef must be >= 0"),
        (dict(reinforce_value_coef=-1), ValueError, "reinforce_value_coef must be >= 0"),
        (dict(expert_choice_capacity_factor=0), ValueError, "expert_choice_capacity_factor must be > 0"),
        (dict(reinforce_huber_delta=0), ValueError, "reinforce_huber_delta must be > 0"),
        (dict(router_init_std=-0.1), ValueError, "router_init_std must be >= 0"),
        (
            dict(gumbel_temperature_min=2.0, gumbel_temperature_start=1.0),
            ValueError,
            "must be <= gumbel_temperature_start",
        ),
        (dict(tag_to_expert=[0, 9], num_experts=4), ValueError, "outside 0..3"),
        (dict(router="nope"), ValueError, "Unknown router 'nope'"),
        (dict(router="moesart", top_k=1), ValueError, "needs top_k >= 2"),
        (dict(top_k=5, num_experts=4), ValueError, "top_k=5 is larger than num_experts=4"),
    ],
)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_cases_users_hit(config, kwargs, error, message):
    with pytest.raises(error, match=message):
        CONFIGS[config](**kwargs)


def test_the_defaults_and_saved_values_pass():
    for make in CONFIGS.values():
        make()
    RoutedAdapterConfig(
        router_temperature=1,
        router_init_std=0.0,
        xmoe_dim=3,
        router_jitter_noise=0.0,
        tag_to_expert=[0, 0, 1],
        tag_to_expert_pattern={"encoder": [0, 1, 1]},
        hash_seed=-7,
    )
    RoutedFFNConfig(
        init_weights=False,
        expert_dim=8,
        shared_neurons=0,
        ffn_in_proj="mlp.fc1",
        ffn_out_proj="mlp.fc2",
        ffn_activation="gelu",
    )
