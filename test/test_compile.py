"""torch.compile(fullgraph=True) of quantized models: one graph, no breaks, equal to eager."""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import torchq

CONFIGS = {
    "int8_weight_only": torchq.int8_weight_only(),
    "int4_weight_only": torchq.int4_weight_only(group_size=32),
    "w8a8": torchq.int8_dynamic_activation_int8_weight(),
    "w4a8": torchq.int8_dynamic_activation_int4_weight(group_size=32),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model_and_input(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64), nn.SiLU(), nn.Linear(64, 40, bias=False)).to(dtype).eval()
    return model, torch.randn(2, 5, 96, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fullgraph_matches_eager(name, dtype):
    model, x = model_and_input(dtype)
    torchq.quantize_(model, CONFIGS[name])
    with torch.no_grad():
        eager = model(x)
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        out = compiled(x)
        out2 = compiled(x)
    assert counter.frame_count == 1, "compile fell back or recompiled"
    assert counter.op_count >= 3
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, eager, **tol)
    assert torch.equal(out, out2)


def test_graph_break_would_be_caught():
    """The counter really sees breaks: a model with a forced break fails fullgraph."""
    model, x = model_and_input(torch.float32)
    torchq.quantize_(model, CONFIGS["int8_weight_only"])

    def broken(inp):
        y = model(inp)
        torch._dynamo.graph_break()
        return y

    with pytest.raises(Exception, match="graph_break|Graph break"):
        torch.compile(broken, fullgraph=True, backend="eager")(x)


def test_matmul_with_transposed_weight_compiles():
    model, x = model_and_input(torch.float32)
    torchq.quantize_(model, CONFIGS["int4_weight_only"])
    w = model[0].weight

    def f(inp):
        return inp @ w.t()

    counter = CompileCounterWithBackend("inductor")
    out = torch.compile(f, fullgraph=True, backend=counter)(x)
    assert counter.frame_count == 1
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
