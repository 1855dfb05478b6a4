"""merge_module.layer_inputs: which layer a weight key names, and the inputs its forwards record."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_score.merge_module.layer_inputs import attention_values, layer_owner, record_layer_inputs


class Block(nn.Module):
    """An attention and an MLP, as in a transformer block; ``cross``: the attention's key/value are other tokens."""

    def __init__(self, width: int = 8, batch_first: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2, batch_first=batch_first)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 2 * width))
        self.mlp.add_module("c_proj", nn.Linear(2 * width, width))
        self.cross = cross

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.flip(0) if self.cross else x
        x = x + self.attn(x, context, context, need_weights=False)[0]
        return x + self.mlp.c_proj(torch.relu(self.mlp.c_fc(x)))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_weight_key_names_its_layer_and_how_its_input_is_found() -> None:
    block = Block()
    assert layer_owner(block, "mlp.c_fc.weight") == (block.mlp.c_fc, "input")
    assert layer_owner(block, "attn.in_proj_weight") == (block.attn, "input")
    assert layer_owner(block, "attn.out_proj.weight") == (block.attn, "attention_values")
    with pytest.raises(ValueError, match=r"Weight key 'mlp.c_up.weight' names no layer of Block \('mlp.c_up'\)"):
        layer_owner(block, "mlp.c_up.weight")


@pytest.mark.parametrize("batch_first", [False, True])
def test_every_forward_records_each_layers_inputs_as_rows(batch_first: bool) -> None:
    torch.manual_seed(0)
    block = Block(batch_first=batch_first).eval()
    x = torch.randn(5, 3, 8)  # [tokens, batch, width] (or [batch, tokens, width])
    keys = ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    seen: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    attention_out, fc_in = [], []
    block.attn.register_forward_hook(lambda m, a, out: attention_out.append(out[0]))
    block.mlp.c_fc.register_forward_pre_hook(lambda m, a: fc_in.append(a[0]))
    with torch.no_grad(), record_layer_inputs(block, keys, lambda key, rows: seen[key].append(rows)):
        block(x)
        block(x)
    assert all(len(chunks) == 2 for chunks in seen.values())  # once per forward
    assert all(rows.shape == (15, 8) or rows.shape == (15, 16) for chunks in seen.values() for rows in chunks)
    torch.testing.assert_close(seen["attn.in_proj_weight"][0], x.reshape(-1, 8))
    torch.testing.assert_close(seen["mlp.c_fc.weight"][0], fc_in[0].reshape(-1, 8))
    projected = seen["attn.out_proj.weight"][0] @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    torch.testing.assert_close(projected, attention_out[0].reshape(-1, 8), rtol=1e-5, atol=1e-5)
    values = attention_values(block.attn, (x, x, x), {})
    torch.testing.assert_close(values.reshape(-1, 8), seen["attn.out_proj.weight"][1])


def test_the_hooks_are_removed_afterwards_even_on_an_error() -> None:
    block = Block()
    before = _hooks(block)
    with record_layer_inputs(block, ["mlp.c_fc.weight", "attn.out_proj.weight"], lambda key, rows: None):
        assert _hooks(block) == before + 2
    assert _hooks(block) == before
    with pytest.raises(RuntimeError, match="stop"), record_layer_inputs(block, ["mlp.c_fc.weight"], lambda k, r: None):
        raise RuntimeError("stop")
    assert _hooks(block) == before


def test_a_cross_attentions_in_proj_is_refused() -> None:
    block = Block(cross=True)
    with (
        pytest.raises(ValueError, match="'attn.in_proj_weight' belongs to a cross-attention"),
        torch.no_grad(),
        record_layer_inputs(block, ["attn.in_proj_weight"], lambda key, rows: None),
    ):
        block(torch.randn(4, 2, 8))
    assert _hooks(block) == 0
