"""Conv experts on channels-first feature maps: 1x1-convolution bottlenecks routed per example on the spatial mean,
in transformers' ResNetForImageClassification (stock Trainer, save/load) and in a plain nn.Module CNN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments, default_data_collator

import hf_condroute
from hf_condroute import RoutedAdapterConfig
from hf_condroute.block.feature_maps import feature_map_rows, route_feature_map, rows_to_feature_map
from hf_condroute.block.routed_block import RoutedBlock
from hf_condroute.experts import AdapterBank
from hf_condroute.routers import build_router
from hf_condroute.routers.config import RoutingConfig

C, R, N = 5, 4, 3


def conv_reference(bank: AdapterBank, e: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    """Expert e as two explicit 1x1 convolutions, with the weights feature_maps' docstring documents."""
    down, up = nn.Conv2d(bank.in_features, bank.adapter_dim, 1), nn.Conv2d(bank.adapter_dim, bank.out_features, 1)
    with torch.no_grad():
        down.weight.copy_(bank.down_weight[e].T[:, :, None, None])
        down.bias.copy_(bank.down_bias[e])
        up.weight.copy_(bank.up_weight[e].T[:, :, None, None])
        up.bias.copy_(bank.up_bias[e])
    return down, up


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_experts_equal_explicit_1x1_convolutions_forward_and_backward(channels_last):
    torch.manual_seed(0)
    bank = AdapterBank(N, C, R, init_weights=False)
    with torch.no_grad():
        bank.down_bias.normal_()
        bank.up_bias.normal_()
    x = torch.randn(4, C, 3, 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        assert feature_map_rows(x).data_ptr() == x.data_ptr() and feature_map_rows(x).is_contiguous()  # no copy
    x.requires_grad_()
    experts = torch.tensor([[0, 2], [1, -1], [2, 0], [1, 1]])
    weights = torch.rand(4, 2)
    out = rows_to_feature_map(bank(feature_map_rows(x), experts, weights), 3, 2)
    convs = [conv_reference(bank, e) for e in range(N)]
    xr = x.detach().clone().requires_grad_()
    ref = torch.stack(
        [
            sum(
                weights[b, j] * convs[e][1](F.relu(convs[e][0](xr[b : b + 1])))[0]
                for j, e in enumerate(experts[b].tolist())
                if e >= 0
            )
            for b in range(4)
        ]
    )
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for e, (down, up) in enumerate(convs):
        torch.testing.assert_close(bank.down_weight.grad[e], down.weight.grad[:, :, 0, 0].T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank.down_bias.grad[e], down.bias.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank.up_weight.grad[e], up.weight.grad[:, :, 0, 0].T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank.up_bias.grad[e], up.bias.grad, rtol=1e-5, atol=1e-6)


def test_a_block_on_a_feature_map_routes_each_example_on_its_spatial_mean():
    torch.manual_seed(0)
    config = RoutingConfig(router="top_k", num_experts=N, router_batchnorm=False)
    block = RoutedBlock(build_router(config, C, "b"), AdapterBank(N, C, R, init_weights=False), name="b").eval()
    x = torch.randn(6, C, 4, 3)
    out = route_feature_map(block, x)
    decision = block.router(x.mean(dim=(2, 3)))
    rows = feature_map_rows(x)
    expected = rows_to_feature_map(block.experts(rows, decision.experts, decision.weights), 4, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    block.granularity = "token"
    with pytest.raises(ValueError, match="route per example"):
        route_feature_map(block, x)


# ----- transformers' ResNet ---------------------------------------------------------------------------------
def make_resnet(seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    pixels = torch.randn(n, 3, 16, 16, generator=g) + labels.view(-1, 1, 1, 1).float()
    return pixels, labels


def test_resnet_defaults_target_every_residual_block_and_start_as_the_base():
    model = get_peft_model(make_resnet(), RoutedAdapterConfig(num_experts=N, adapter_dim=R))
    assert sorted(model.targeted_module_names) == [
        "resnet.encoder.stages.0.layers.0",
        "resnet.encoder.stages.1.layers.0",
    ]
    pixels, _ = images(4)
    out = model(pixel_values=pixels).logits
    decisions = hf_condroute.get_routing(model)
    with model.disable_adapter():
        base = model(pixel_values=pixels).logits
    torch.testing.assert_close(out, base, rtol=0, atol=0)  # up projections start at zero
    assert set(decisions) == set(model.targeted_module_names)
    assert all(d.experts.shape == (4, 1) for d in decisions.values())


@pytest.mark.parametrize("router", ["tag", "top_k"])
def test_resnet_trains_with_the_stock_trainer_and_saves_and_loads(router, tmp_path):
    config = RoutedAdapterConfig(
        num_experts=N,
        adapter_dim=R,
        router=router,
        modules_to_save=["classifier"],
        router_aux_loss_coef=0.01 if router == "top_k" else 0.0,
    )
    model = get_peft_model(make_resnet(), config)
    pixels, labels = images(24)
    data = Dataset.from_list(
        [{"pixel_values": p.tolist(), "labels": int(y), "routing_tags": int(y)} for p, y in zip(pixels, labels)]
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(".experts.up_weight" in n for n in changed) and any("classifier" in n for n in changed)
    if router == "top_k":
        assert any(".router.network." in n for n in changed)
    model.eval()
    batch = {"pixel_values": pixels[:6], "routing_tags": labels[:6]}
    with torch.no_grad():
        expected = model(**batch).logits
    if router == "tag":
        assert all(d.experts[:, 0].tolist() == labels[:6].tolist() for d in hf_condroute.get_routing(model).values())
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make_resnet(), tmp_path / "adapter").eval()
    # the frozen base's own BatchNorm statistics moved in training (as with any adapter): they are the base's, not
    # the adapter's, so take them over; the routers' statistics must come from the checkpoint
    trained = dict(model.named_buffers())
    with torch.no_grad():
        for name, buffer in loaded.named_buffers():
            if "routed_adapter_block" not in name:
                buffer.copy_(trained[name])
    with torch.no_grad():
        again = loaded(**batch).logits
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_resnet_per_token_routing_is_refused_at_injection():
    with pytest.raises(ValueError, match=r"routing_granularity='token' would route every pixel"):
        get_peft_model(make_resnet(), RoutedAdapterConfig(num_experts=N, adapter_dim=R, routing_granularity="token"))


def test_resnet_in_bfloat16():
    model = get_peft_model(
        make_resnet().to(torch.bfloat16), RoutedAdapterConfig(num_experts=N, adapter_dim=R, init_weights=False)
    )
    model.train()
    pixels, labels = images(4)
    out = model(pixel_values=pixels.to(torch.bfloat16), labels=labels)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    bank = next(m for m in model.modules() if isinstance(m, AdapterBank))
    assert bank.up_weight.dtype == torch.float32 and bank.up_weight.grad is not None  # PEFT's autocast of adapters


# ----- a plain nn.Module CNN --------------------------------------------------------------------------------
class Residual(nn.Module):
    """A user's residual block: no `out_channels` attribute, ends in a Conv2d."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Residual(8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.block(F.relu(self.stem(x)))
        return self.head(self.norm(h.mean(dim=(2, 3))))


def test_plain_cnn_trains_with_routing_loss():
    torch.manual_seed(0)
    config = RoutedAdapterConfig(
        target_modules=["stem", "block"],
        num_experts=N,
        adapter_dim=R,
        router="top_k",
        router_aux_loss_coef=0.1,
        router_z_loss_coef=0.01,
    )
    model = get_peft_model(TinyCNN(), config)
    banks = {n: m.experts.in_features for n, m in model.named_modules() if isinstance(m, RoutedBlock)}
    assert sorted(banks.values()) == [8, 8]
    pixels, labels = images(8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    for _ in range(3):
        logits = model(pixels)
        aux = hf_condroute.routing_loss(model)
        assert float(aux.detach()) > 0
        loss = F.cross_entropy(logits, labels) + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any("stem.routed_adapter_block.default.router.network.proj" in n for n in changed)
    assert any("block.routed_adapter_block.default.experts.up_weight" in n for n in changed)
    assert set(hf_condroute.get_routing_losses(model)) == {"load_balance", "z_loss"}


def test_plain_cnn_channels_clear_errors():
    with pytest.raises(TypeError, match="feature_channels"):  # a LayerNorm has no conv and no out_channels
        get_peft_model(TinyCNN(), RoutedAdapterConfig(target_modules=["norm"], num_experts=N, adapter_dim=R))
    model = get_peft_model(
        TinyCNN(), RoutedAdapterConfig(target_modules=["block"], feature_channels=6, num_experts=N, adapter_dim=R)
    )
    with pytest.raises(
        ValueError, match=r"feature map \(batch, 6, height, width\), but it outputs shape \(2, 8, 4, 4\)"
    ):
        model(torch.randn(2, 3, 4, 4))
    right = get_peft_model(
        TinyCNN(), RoutedAdapterConfig(target_modules=["block"], feature_channels=8, num_experts=N, adapter_dim=R)
    )
    assert right(torch.randn(2, 3, 4, 4)).shape == (2, 3)
