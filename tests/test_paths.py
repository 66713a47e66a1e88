"""The path graph: counting without enumerating, composable filters, pictures."""

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jetfx
from jetfx import paths as P
from tiny_models import LinearResNet, traced

# filters that name blocks are built per architecture (a pattern matching no block is an error)
NAMES = {"gpt2": {"layer": "h", "attn": "attn"}, "gpt_neox": {"layer": "layers", "attn": "attention"}}
BASIC = [lambda n: P.all_paths(), lambda n: P.max_blocks(1), lambda n: P.max_blocks(2), lambda n: P.min_blocks(2),
         lambda n: P.only_kinds("mlp"), lambda n: P.no_attention(), lambda n: P.through("*.0.*"),
         lambda n: P.within(f"{n['layer']}.0.*", f"{n['layer']}.1.mlp"), lambda n: P.avoid(f"*.1.{n['attn']}*"),
         lambda n: P.paths("embed", f"{n['layer']}.0.{n['attn']}>{n['layer']}.1.mlp"),
         lambda n: P.where(lambda p: len(p) % 2 == 0)]
COMBINE = st.recursive(st.sampled_from(BASIC), lambda inner: st.one_of(
    st.tuples(inner, inner).map(lambda ab: lambda n: ab[0](n) & ab[1](n)),
    st.tuples(inner, inner).map(lambda ab: lambda n: ab[0](n) | ab[1](n)),
    inner.map(lambda a: lambda n: ~a(n))), max_leaves=4)


@settings(max_examples=60, deadline=None)
@given(filt=COMBINE, arch=st.sampled_from(["gpt2", "gpt_neox"]))
def test_count_by_dynamic_programming_equals_enumeration(filt, arch):
    _, gm = traced(arch)
    filt = filt(NAMES[arch])
    graph = jetfx.path_graph(gm)
    enumerated = list(graph.iter_paths(filt))
    everything = list(graph.iter_paths())
    assert graph.count(filt) == len(enumerated)
    # the filter algebra agrees with the same predicates on enumerated paths
    assert set(map(str, enumerated)) <= set(map(str, everything))
    assert graph.count(~filt) == len(everything) - len(enumerated)


@pytest.mark.parametrize("layers", [1, 4, 10, 40])
def test_sequential_network_has_two_to_the_L_paths(layers):
    gm = jetfx.trace(LinearResNet(layers=layers, width=3), torch.randint(0, 11, (1, 2)))
    graph = jetfx.path_graph(gm)
    assert graph.count() == 2**layers == gm.residual.num_paths
    assert graph.count(P.max_blocks(1)) == layers + 1
    assert graph.count(P.max_blocks(2)) == 1 + layers + layers * (layers - 1) // 2


def test_parallel_residual_layers_give_three_choices_each():
    _, gm = traced("gpt_neox")
    graph = jetfx.path_graph(gm)
    assert graph.count() == 9
    # a path never goes through both blocks of one parallel layer
    assert graph.count(P.through("layers.0.attention") & P.through("layers.0.mlp")) == 0
    assert nx_is_dag(graph)


def nx_is_dag(graph):
    import networkx as nx

    return nx.is_directed_acyclic_graph(graph.graph)


def test_path_names_round_trip_and_bad_filters():
    _, gm = traced("gpt2")
    graph = jetfx.path_graph(gm)
    names = [p.name for p in graph.iter_paths()]
    assert names[0] == "embed" and "h.0.attn>h.0.mlp>h.1.attn>h.1.mlp" in names
    assert [p.name for p in graph.iter_paths(P.paths(*names[:3]))] == names[:3]
    with pytest.raises(jetfx.ExpansionError, match="kinds"):
        P.only_kinds("ffn")
    with pytest.raises(jetfx.ExpansionError):
        P.through()


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed (apt-get install graphviz)")
def test_render_path_graph_svg(tmp_path):
    _, gm = traced("gpt2")
    ex = jetfx.expand(gm, k=0, paths=P.only_kinds("mlp"))
    svg = ex.render(str(tmp_path / "paths.svg"))
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    for b in gm.residual.blocks:
        assert f"{b.name}" in svg and b.kind in svg
    assert svg.count("#c0392b") >= 4  # highlighted edges and blocks of the selected paths
    assert (tmp_path / "paths.svg").read_text() == svg
