"""callback.adapters: a PEFT-adapted module read as the weights it computes with (merge_and_unload's), by base key."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from lightning_score.callback.adapters import (  # noqa: E402
    UnsupportedAdapterError,
    adapted_keys,
    adapter_targets,
    effective_state,
    holds_adapters,
    low_rank_updates,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc1 = nn.Linear(8, 16)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc2 = nn.Linear(16, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens, image):
        x = self.emb(tokens)  # [L, 8]
        x = self.attn(x[:, None], x[:, None], x[:, None])[0][:, 0] + self.conv(image).mean((-1, -2))
        return self.head(self.fc2(torch.relu(self.fc1(x))))


TARGETS = ["fc1", "fc2", "emb", "attn", "conv"]


def _trained(model: nn.Module, seed: int = 1) -> nn.Module:
    """Every adapter and saved-module parameter moved, as training would (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g).to(param.dtype))
    return model


def _with_a_second_adapter(model: nn.Module) -> nn.Module:
    """``model`` with a second LoRA adapter on fc1, both active and trainable."""
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]))
    model.base_model.set_adapter(["default", "other"])
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    return model


def _gpt_like() -> type[nn.Module]:
    """A module whose layer stores its weight [in, out], as transformers' Conv1D does (PEFT's fan_in_fan_out)."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class GPTLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(12, 4)  # weight [in=4, out=12]

        def forward(self, x):
            return self.c_attn(x)

    return GPTLike


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 10, (5,), generator=g), torch.randn(5, 3, 6, 6, generator=g)


def _adapted_net() -> tuple[nn.Module, nn.Module]:
    """The base Net (seed 0) and a trained copy with LoRA on every target layer type, ``head`` saved whole."""
    torch.manual_seed(0)
    net = Net()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["head"])
    return net, _trained(peft.get_peft_model(copy.deepcopy(net), config))


def _assert_is_merge_and_unload(model: nn.Module, atol: float = 0.0) -> dict[str, torch.Tensor]:
    state = effective_state(model)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sorted(state) == sorted(merged)
    for key, value in merged.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=atol, msg=key)
    return state


def test_every_lora_layer_type_reads_as_merge_and_unloads_weights_under_the_base_models_keys():
    net, model = _adapted_net()
    state = _assert_is_merge_and_unload(model)
    assert sorted(state) == sorted(net.state_dict())  # the keys a full fine-tune of the same net gives
    assert not any("lora_" in key or "base_layer" in key or "modules_to_save" in key for key in state)
    # the weights are what the adapted model computes with
    plain = copy.deepcopy(net)
    plain.load_state_dict(state)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(*_inputs()), model(*_inputs()), rtol=1e-5, atol=1e-5)
    # each adapted weight moved by its update, the frozen rest did not
    for key in ("fc1.weight", "fc2.weight", "emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "conv.weight"):
        assert not torch.equal(state[key], net.state_dict()[key]), key
    for key in ("fc1.bias", "attn.in_proj_bias"):
        assert torch.equal(state[key], net.state_dict()[key]), key


def test_untrained_adapters_read_as_the_base_weights_themselves():
    net = Net()
    model = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=TARGETS))
    state = effective_state(model)
    for key, value in net.state_dict().items():
        assert torch.equal(state[key], value), key


def test_rslora_lora_bias_and_several_active_adapters():
    net = Net()
    config = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, lora_bias=True, target_modules=["fc1", "fc2"])
    model = _trained(_with_a_second_adapter(peft.get_peft_model(copy.deepcopy(net), config)))
    fc1 = model.base_model.model.fc1
    assert fc1.scaling["default"] == pytest.approx(16 / 4**0.5)
    state = _assert_is_merge_and_unload(model, atol=1e-6)
    assert not torch.equal(state["fc1.bias"], net.fc1.bias)  # lora_bias moves the base bias


def test_fan_in_fan_out_layers_read_in_the_base_weights_layout():
    net = _gpt_like()()
    model = _trained(
        peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    )
    state = _assert_is_merge_and_unload(model)
    assert state["c_attn.weight"].shape == (4, 12)


def test_adapters_injected_without_a_peft_model_and_a_peft_model_inside_another_module():
    net = Net()
    injected = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["fc1"]), copy.deepcopy(net))
    _trained(injected)
    state = effective_state(injected)
    assert sorted(state) == sorted(net.state_dict())
    assert not torch.equal(state["fc1.weight"], net.fc1.weight)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _trained(
                peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["fc2"]))
            )
            self.extra = nn.Linear(2, 2)

    holder = Holder()
    keys = adapted_keys(holder)
    assert (
        "backbone.fc2.weight" in keys
        and keys["backbone.fc2.weight"] == "backbone.base_model.model.fc2.base_layer.weight"
    )
    assert "extra.weight" in keys and not any("lora_" in raw for raw in keys.values())
    torch.testing.assert_close(
        effective_state(holder)["backbone.fc2.weight"],
        copy.deepcopy(holder.backbone).merge_and_unload().fc2.weight,
        rtol=0,
        atol=0,
    )


def test_bf16_adapted_weights_read_exactly_as_peft_merges_them():
    # PEFT keeps the adapters in float32 on a bf16 base; each layer type rounds the update its own way
    model = _trained(peft.get_peft_model(Net().to(torch.bfloat16), peft.LoraConfig(r=4, target_modules=TARGETS)))
    assert model.base_model.model.fc1.lora_A["default"].weight.dtype == torch.float32
    state = _assert_is_merge_and_unload(model)
    assert all(value.dtype == torch.bfloat16 for value in state.values())


def test_the_live_tensors_are_read_for_entries_without_adapters_and_the_module_is_not_changed():
    model = _trained(peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["fc1"])))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    state = effective_state(model)
    assert state["fc2.weight"] is model.base_model.model.fc2.weight
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            lambda: peft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]),
            r"'fc1' is a PEFT IA3 layer \(peft\.tuners\.ia3",
        ),
        (lambda: peft.LoraConfig(r=2, target_modules=["fc1"], use_dora=True), r"'fc1' uses a LoRA variant.*DoRA"),
        (lambda: peft.LoHaConfig(r=2, target_modules=["fc1"]), r"'fc1' is a PEFT LOHA layer"),
    ],
)
def test_adapters_that_are_not_lora_updates_are_refused_naming_the_layer(config, match):
    model = peft.get_peft_model(Net(), config())
    with pytest.raises(UnsupportedAdapterError, match=match):
        effective_state(model)
    with pytest.raises(UnsupportedAdapterError, match=match):
        adapted_keys(model)


def test_an_adapter_merged_into_its_base_weights_is_refused():
    model = _trained(peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["fc1"])))
    model.merge_adapter()
    with pytest.raises(UnsupportedAdapterError, match=r"'fc1' has adapter\(s\) \['default'\] merged.*unmerge_adapter"):
        effective_state(model)


def test_holds_adapters():
    net = Net()
    assert not holds_adapters(net)
    assert holds_adapters(peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["fc1"])))
    assert holds_adapters(
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["fc1"]), copy.deepcopy(net))
    )


def test_each_adapter_parameter_names_the_weights_it_updates():
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["fc1", "attn"], lora_bias=False))
    targets = adapter_targets(model)
    assert targets["base_model.model.fc1.lora_A.default.weight"] == ("fc1.weight",)
    assert targets["base_model.model.fc1.lora_B.default.weight"] == ("fc1.weight",)
    assert targets["base_model.model.attn.lora_A.default.weight"] == ("attn.in_proj_weight", "attn.out_proj.weight")
    assert targets["base_model.model.attn.base_layer.out_proj.lora_B.default.weight"] == ("attn.out_proj.weight",)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable <= set(targets)
    with_bias = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["fc2"], lora_bias=True))
    assert adapter_targets(with_bias)["base_model.model.fc2.lora_B.default.bias"] == ("fc2.weight", "fc2.bias")


def test_the_open_clip_tiny_image_tower_with_lora_reads_as_merge_and_unload():
    """open_clip's blocks: nn.MultiheadAttention (fused in_proj_weight, out_proj) and the MLP's c_fc / c_proj."""
    from lightning_score.models.factory import build_clip

    torch.manual_seed(0)
    visual = build_clip("tiny-ViT-W64-L2").model.visual
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn", "c_fc", "c_proj"])
    model = _trained(peft.get_peft_model(copy.deepcopy(visual), config))
    state = _assert_is_merge_and_unload(model, atol=1e-6)
    assert sorted(state) == sorted(visual.state_dict())  # the keys a full fine-tune of the tower gives
    for key in ("transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.1.mlp.c_proj.weight"):
        assert not torch.equal(state[key], visual.state_dict()[key]), key
    images = torch.randn(2, 3, *visual.image_size)
    plain = copy.deepcopy(visual)
    plain.load_state_dict(state)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model(images), rtol=1e-4, atol=1e-5)


def _assert_factors_are_the_updates(model: nn.Module, base: nn.Module, atol: float = 1e-6) -> dict:
    """low_rank_updates: each factor entry's s·B·A is effective_state's (merge_and_unload's) weight minus the base
    (to ``atol`` relative to the update's largest entry: merge_and_unload's float32 sum rounds)."""
    factors, state = low_rank_updates(model), effective_state(model)
    for key, update in factors.items():
        expected = state[key].double() - base.state_dict()[key].double()
        scale = max(1.0, expected.abs().max().item())  # float32 weights of size ~17: relative to them
        torch.testing.assert_close(update.dense(torch.float64), expected, rtol=0, atol=atol * scale, msg=key)
        assert update.dtype == base.state_dict()[key].dtype
    return factors


def test_the_adapted_weights_as_factors_are_their_updates_exactly():
    """Linear, Embedding and MultiheadAttention (out_proj's update counted twice): factors; a conv kernel: dense."""
    net, model = _adapted_net()
    factors = _assert_factors_are_the_updates(model, net)
    assert sorted(factors) == ["attn.in_proj_weight", "attn.out_proj.weight", "emb.weight", "fc1.weight", "fc2.weight"]
    assert factors["emb.weight"].shape == (10, 8) and factors["fc1.weight"].rank == 4
    out_proj = model.base_model.model.attn.base_layer.out_proj
    assert factors["attn.out_proj.weight"].rank == 4  # the update added twice: its factors once, twice the scale
    assert factors["attn.out_proj.weight"].scale == pytest.approx(2 * out_proj.scaling["default"])


def test_factors_of_several_adapters_rslora_and_fan_in_fan_out():
    net = Net()
    config = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["fc1", "fc2"])
    model = _trained(_with_a_second_adapter(peft.get_peft_model(copy.deepcopy(net), config)))
    factors = _assert_factors_are_the_updates(model, net)
    assert factors["fc1.weight"].rank == 6 and factors["fc2.weight"].rank == 4  # the adapters' ranks add up
    gpt = _gpt_like()()
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    factors = _assert_factors_are_the_updates(_trained(peft.get_peft_model(copy.deepcopy(gpt), lora)), gpt)
    assert factors["c_attn.weight"].shape == (4, 12)


def test_a_base_weight_that_trains_too_stays_a_dense_entry():
    net = Net()
    model = _trained(peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["fc1", "fc2"])))
    model.base_model.model.fc1.base_layer.weight.requires_grad_(True)
    assert sorted(low_rank_updates(model)) == ["fc2.weight"]
