"""Capture of tiny diffusers DiTs: blocks, contracts, roles, output equality, annotations."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.utils._pytree as pytree

from dit_opt.ir import META_BLOCK, META_FLOPS, META_MODULE
from dit_opt.testing import TINY_CONFIGS, tiny_names

TINY = tiny_names()

# Roles each tiny model's blocks must show (every block of the first list).
EXPECTED_ROLES = {
    "dit": {"attn", "mlp", "norm"},
    "pixart": {"attn", "cross_attn", "mlp", "norm"},
    "sd3": {"attn", "mlp", "norm"},
    "flux": {"attn", "mlp", "norm"},
    "sana": {"attn", "cross_attn", "mlp", "norm"},
    "wan": {"attn", "cross_attn", "mlp", "norm"},
    "cogvideox": {"attn", "mlp", "norm"},
    "qwenimage": {"attn", "mlp", "norm"},
    "auraflow": {"attn", "mlp", "norm"},
    "chroma": {"attn", "mlp", "norm"},
    "ltx": {"attn", "cross_attn", "mlp", "norm"},
    "latte": {"attn", "cross_attn", "mlp", "norm"},
    "cogview4": {"attn", "norm"},
    "mochi": {"attn", "mlp", "norm"},  # its ff runs twice per block call: no module-level unit
    "lumina2": {"attn", "mlp", "norm"},  # captured block by block
    "hunyuandit": {"attn", "cross_attn", "mlp", "norm"},
}


def _tensors(out):
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("name", TINY)
def test_blocks_found_per_list(captured, name):
    _, _, g = captured(name)
    expected = TINY_CONFIGS[name][2]
    counts = {ln: sum(1 for b in g.blocks if b.list_name == ln) for ln in g.list_names}
    assert counts == expected, f"{name}: found {counts}, expected {expected}"
    for ln in g.list_names:
        assert [b.index for b in g.blocks if b.list_name == ln] == list(range(expected[ln]))


@pytest.mark.parametrize("name", TINY)
def test_top_graph_calls_each_block_once(captured, name):
    _, _, g = captured(name)
    calls = [n.target for n in g.gm.graph.nodes if n.op == "call_module" and n.target in {b.name for b in g.blocks}]
    assert sorted(calls) == sorted(b.name for b in g.blocks)
    assert all(node.meta[META_BLOCK] == spec.name for spec, node in g.block_nodes())


@pytest.mark.parametrize("name", TINY)
def test_output_equals_model(captured, name):
    model, inputs, g = captured(name)
    with torch.no_grad():
        ref = _tensors(model(**inputs))
        got = _tensors(g(**inputs))
        flat = _tensors(g.full(g.flat_inputs(**inputs)))
    assert len(ref) == len(got) == len(flat)
    for r, o, f in zip(ref, got, flat, strict=True):
        diff = float((r - o).abs().max())
        assert diff <= 1e-5, f"{name}: captured output differs by {diff}"
        assert torch.equal(o, f)
    assert type(g(**inputs)) is type(model(**inputs))


@pytest.mark.parametrize("name", TINY)
def test_captured_modules_run_their_generated_code_where_it_is_current(captured, name):
    import sys

    unflatten = sys.modules["torch.export.unflatten"]
    model, inputs, g = captured(name)
    mods = [m for m in g.module.modules() if isinstance(m, unflatten.InterpreterModule)]
    fast = [m for m in mods if not m._run_with_interpreter]
    assert fast, f"{name}: every captured module runs through the fx interpreter"
    for m in fast:
        assert m.graph_module.code == m.graph.python_code("self").src
    with torch.no_grad():
        got = _tensors(g(**inputs))
        for m in fast:
            m._run_with_interpreter = True
        try:
            interpreted = _tensors(g(**inputs))
        finally:
            for m in fast:
                m._run_with_interpreter = False
    assert all(torch.equal(a, b) for a, b in zip(got, interpreted, strict=True))


@pytest.mark.parametrize("name", TINY)
def test_roles_found(captured, name):
    _, _, g = captured(name)
    first = g.blocks[0]
    assert set(first.roles) == EXPECTED_ROLES[name], f"{name}: roles {first.modules}"
    for b in g.blocks:
        for role in b.roles:
            for m in b.role_modules(role):
                assert isinstance(g.model.get_submodule(f"{b.name}.{m}"), torch.nn.Module)


@pytest.mark.parametrize("name", TINY)
def test_block_contract(captured, name):
    _, _, g = captured(name)
    for b in g.blocks:
        names = [n for n, _ in b.inputs]
        assert "hidden_states" in names
        streams = [o.input_name for o in b.outputs if o.spec is not None]
        assert "hidden_states" in streams, f"{b.name}: outputs {b.outputs}"
        for o in b.outputs:
            if o.input_name is not None:
                assert dict(b.inputs)[o.input_name].shape == o.spec.shape


def test_a_module_called_twice_per_block_is_no_unit(captured):
    """CogView4's blocks run ``ff`` on the image and then on the text tokens: it has no one output to
    serve, so it is left out of the roles (the profile crashed measuring it) and named in the summary."""
    _, _, g = captured("cogview4")
    assert g.repeated_modules == ("transformer_blocks.0.ff", "transformer_blocks.1.ff")
    assert "called more than once" in g.summary()
    _, _, dit = captured("dit")
    assert dit.repeated_modules == ()


def test_flux_two_stream_contract(captured):
    _, _, g = captured("flux")
    double = g.block("transformer_blocks.0")
    single = g.block("single_transformer_blocks.0")
    for b in (double, single):
        assert b.output_is_tuple
        assert [o.input_name for o in b.outputs] == ["encoder_hidden_states", "hidden_states"]
    # the single-stream block's proj_out (over attention and MLP outputs) belongs to the MLP role
    assert single.role_modules("mlp") == ("proj_mlp", "act_mlp", "proj_out")
    assert single.role_modules("attn") == ("attn",)
    assert "proj_out" not in double.role_modules("mlp")


def test_sd3_last_block_returns_none_context(captured):
    _, _, g = captured("sd3")
    last = g.blocks[-1]
    assert last.outputs[0].spec is None and last.outputs[1].input_name == "hidden_states"


def test_pixart_cross_attention_is_not_a_stream(captured):
    _, _, g = captured("pixart")
    b = g.blocks[0]
    assert "encoder_hidden_states" in dict(b.inputs)
    assert [o.input_name for o in b.outputs] == ["hidden_states"]
    assert b.role_modules("cross_attn") == ("attn2",)


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_annotations_under_dit_opt_keys(captured, name):
    _, _, g = captured(name)
    sub = g.module.get_submodule(g.blocks[0].name)
    annotated = [n for n in sub.graph.nodes if META_FLOPS in n.meta]
    assert annotated, "no node of the block graph carries dit_opt.flops"
    assert all(n.meta[META_MODULE].startswith(g.blocks[0].name) for n in annotated)
    assert all(k.startswith("dit_opt.") for n in sub.graph.nodes for k in n.meta if "dit_opt" in k)


@pytest.mark.parametrize("name", ["dit", "flux", "pixart"])
def test_networkx_view(captured, name):
    _, _, g = captured(name)
    G = g.to_networkx()
    blocks = [b.name for b in g.blocks]
    assert all(G.nodes[b]["kind"] == "block" for b in blocks)
    data = nx.DiGraph([(u, v) for u, v, d in G.edges(data=True) if d["kind"] == "data"])
    # blocks run one after another: the data edges chain them in execution order
    assert list(nx.topological_sort(data)) == blocks
    mods = [n for n, d in G.nodes(data=True) if d["kind"] == "module"]
    assert mods and all(G.nodes[m]["role"] in ("attn", "cross_attn", "mlp", "norm") for m in mods)


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_summary_is_a_table(captured, name):
    _, _, g = captured(name)
    text = g.summary()
    assert type(g.model).__name__ in text and "GFLOPs" in text
    for b in g.blocks:
        assert b.name in text


def test_block_lookup_error(captured):
    _, _, g = captured("dit")
    with pytest.raises(KeyError, match="no block named"):
        g.block("nope.0")


def test_capture_prints_nothing(capfd):
    """torch 2.13's unflatten prints "Checking mutability ..." on the tiny Wan; dit-opt's capture
    keeps stdout clean (users see only progress bars)."""
    import warnings

    from dit_opt.capture import capture
    from dit_opt.testing import tiny_model

    model, inputs = tiny_model("wan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        capture(model, inputs)
    assert capfd.readouterr().out == ""


def test_blocks_that_take_var_positional_args_inside_a_model_with_an_inner_block_list():
    """HunyuanVideo: its blocks take ``*args`` (positional inputs past the named ones), and its
    context embedder holds a list of refiner blocks, called by the embedder, not by the model."""
    from diffusers import HunyuanVideoTransformer3DModel

    from dit_opt.capture import capture
    from dit_opt.synthetic import example_inputs

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        attention_head_dim=10, guidance_embeds=True, in_channels=4, num_attention_heads=2, num_layers=1,
        num_refiner_layers=1, num_single_layers=1, out_channels=4, patch_size=1, patch_size_t=1,
        pooled_projection_dim=8, rope_axes_dim=[2, 4, 4], text_embed_dim=16).eval()
    inputs = example_inputs(model)
    g = capture(model, inputs)
    assert g.list_names == ("transformer_blocks", "single_transformer_blocks")
    ins = dict(g.block("transformer_blocks.0").inputs)
    assert "freqs_cis.0" in ins and "hidden_states" in ins
    with torch.no_grad():
        assert float((model(**inputs).sample - g(**inputs).sample).abs().max()) <= 1e-5


def test_cogvideox_captures_at_another_resolution():
    """CogVideoX computes its positional table in forward for any size but the configured one, and
    torch.export left a fake tensor among the constants: the table is made for the capture's size."""
    from dit_opt.capture import capture
    from dit_opt.testing import tiny_model

    model, inputs = tiny_model("cogvideox")  # configured for 8 x 8
    before = model.patch_embed.pos_embedding.clone()
    inputs = dict(inputs, hidden_states=torch.randn(2, 3, 4, 12, 16, generator=torch.Generator().manual_seed(1)))
    g = capture(model, inputs)
    with torch.no_grad():
        ref = _tensors(model(**inputs))[0]
        got = _tensors(g.gm(*g.flat_inputs(**inputs)))[0]
    assert got.shape == (2, 3, 4, 12, 16)
    assert torch.allclose(got, ref, atol=1e-5)
    assert model.patch_embed.sample_height == 8 and torch.equal(model.patch_embed.pos_embedding, before)
