"""Clear failures of capture: each names the model class, the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dit_opt
from dit_opt.capture import _candidate_lists, capture, find_block_lists
from dit_opt.testing import tiny_model


class _Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ff = nn.Linear(d, d)

    def forward(self, hidden_states):
        return hidden_states + self.ff(hidden_states)


class NoBlocksNet(nn.Module):
    """A model with no repeated block list."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, hidden_states):
        return self.b(self.a(hidden_states))


class DataDependentNet(nn.Module):
    """Branches on a tensor value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, hidden_states):
        for blk in self.transformer_blocks:
            hidden_states = blk(hidden_states)
        if hidden_states.sum().item() > 0:
            hidden_states = hidden_states * 2
        return hidden_states


class GoodNet(DataDependentNet):
    def forward(self, hidden_states):
        for blk in self.transformer_blocks:
            hidden_states = blk(hidden_states)
        return hidden_states


def test_no_block_list():
    with pytest.raises(dit_opt.NoBlocksFoundError) as e:
        capture(NoBlocksNet(), {"hidden_states": torch.randn(1, 4, 16)})
    msg = str(e.value)
    assert "NoBlocksNet" in msg and "no transformer block list" in msg
    assert "blocks=['transformer_blocks']" in msg


def test_wrong_block_name_lists_candidates():
    with pytest.raises(dit_opt.NoBlocksFoundError) as e:
        capture(GoodNet(), {"hidden_states": torch.randn(1, 4, 16)}, blocks=["blocks"])
    msg = str(e.value)
    assert "'blocks'" in msg and "not a module of the model" in msg
    assert "transformer_blocks (2 x _Block, 544 params)" in msg


def test_blocks_by_hand_and_small_custom_model():
    g = capture(GoodNet(), {"hidden_states": torch.randn(1, 4, 16)}, blocks=["transformer_blocks"])
    assert [b.name for b in g.blocks] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert find_block_lists(GoodNet()) == ["transformer_blocks"]


def test_untraceable_glue_is_captured_block_by_block():
    inputs = {"hidden_states": torch.randn(1, 4, 16)}
    g = capture(DataDependentNet(), inputs)
    assert g.capture_mode == "blocks" and "block by block" in g.describe_capture()
    with torch.no_grad():
        assert torch.allclose(g(**inputs), DataDependentNet.forward(g.model, **inputs))
    with pytest.raises(dit_opt.CaptureError) as e:
        capture(DataDependentNet(), inputs, mode="whole")
    msg = str(e.value)
    assert "DataDependentNet" in msg and "torch.export could not capture" in msg
    assert "data-dependent" in msg and "mode='auto'" in msg


class _DataDependentBlock(_Block):
    def forward(self, hidden_states):
        if hidden_states.sum().item() > 0:  # a branch on a tensor value inside the block
            return hidden_states + self.ff(hidden_states)
        return hidden_states


class DataDependentBlocksNet(DataDependentNet):
    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_DataDependentBlock(), _DataDependentBlock()])


def test_blocks_that_do_not_export_run_as_they_are():
    """Blocks torch.export rejects too are opaque: captured, costed by FlopCounterMode on their
    call, planned and run whole (no module units), and the capture says so."""
    from dit_opt.flops import count_flops
    from passes.annotate_flops import annotate_flops

    model, inputs = DataDependentBlocksNet(), {"hidden_states": torch.randn(1, 4, 16)}
    g = capture(model, inputs)
    assert sorted(g.blockwise.opaque) == ["transformer_blocks.0", "transformer_blocks.1"]
    assert all(not b.roles for b in g.blocks) and "run as they are" in g.describe_capture()
    annotate_flops(g)
    assert g.flops == count_flops(model, **inputs)
    assert g.costs.block_flops()["transformer_blocks.0"] == count_flops(model.transformer_blocks[0], **inputs)


def test_unknown_input_name():
    model, inputs = tiny_model("dit")
    inputs = dict(inputs, latents=inputs["hidden_states"])
    with pytest.raises(dit_opt.InputMismatchError) as e:
        capture(model, inputs)
    msg = str(e.value)
    assert "DiTTransformer2DModel" in msg and "latents" in msg and "Its parameters are" in msg


def test_missing_required_input():
    model, inputs = tiny_model("flux")
    inputs.pop("hidden_states")
    with pytest.raises(dit_opt.InputMismatchError, match="FluxTransformer2DModel.*hidden_states"):
        capture(model, inputs)


def test_inputs_of_wrong_shape():
    model, inputs = tiny_model("dit")
    inputs["hidden_states"] = torch.randn(2, 3, 8, 8)  # 3 channels, the model takes 4
    with pytest.raises(dit_opt.InputMismatchError, match="fails on the example inputs"):
        capture(model, inputs)


def test_inputs_not_a_dict():
    model, inputs = tiny_model("dit")
    with pytest.raises(dit_opt.InputMismatchError, match="must be a dict"):
        capture(model, [inputs["hidden_states"]])


def test_errors_share_a_base_class():
    for cls in (dit_opt.CaptureError, dit_opt.NoBlocksFoundError, dit_opt.InputMismatchError):
        assert issubclass(cls, dit_opt.DitOptError)


class _Extractor(nn.Module):
    """A branch the forward takes only for an input it was not given (ConsisID's face extractor)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)]) for _ in range(3)])
        self.refiners = nn.ModuleList([_Block(), _Block()])


class IdleListNet(GoodNet):
    def __init__(self) -> None:
        super().__init__()
        self.extractor = _Extractor()

    def forward(self, hidden_states, faces=None):
        if faces is not None:
            for blk in self.extractor.refiners:
                faces = blk(faces)
            hidden_states = hidden_states + faces
        return super().forward(hidden_states)


def test_lists_the_forward_never_calls_are_not_the_blocks():
    """A list of containers is no block list, and a discovered list that this forward never calls
    (a branch for an input not given) is left out rather than failing the capture."""
    model = IdleListNet()
    assert "extractor.layers" not in [name for name, _, _ in _candidate_lists(model)]
    assert find_block_lists(model) == ["transformer_blocks", "extractor.refiners"]
    g = capture(model, {"hidden_states": torch.randn(1, 4, 16)})
    assert g.list_names == ("transformer_blocks",)
    with pytest.raises(dit_opt.NoBlocksFoundError, match="never called"):  # named by hand: as asked
        capture(model, {"hidden_states": torch.randn(1, 4, 16)}, blocks=["extractor.refiners"])
