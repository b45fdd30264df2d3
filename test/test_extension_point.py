"""A new 4-bit codebook format, added from outside the package in one call, gets quantize,
explain, save/load (safetensors, torch.load) and the fused C++ CPU kernel. Runs in a fresh
process: registration is global and the other tests sample the built-in formats."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import io, tempfile, os
    import torch
    import torch.nn.functional as F
    from torch import nn
    import torchq

    # 1. the format: a 16-entry table (here: 16 evenly spaced levels, no zero), one call
    values = torch.linspace(-1, 1, 16).tolist()
    torchq.register_codebook("even16", values)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 40), nn.SiLU(), nn.Linear(40, 24))
    float_model = nn.Sequential(*[m for m in model])
    x = torch.randn(7, 96)
    with torch.no_grad():
        y_float = model(x)
    # 2. the config that exists for every registered codebook
    report = torchq.quantize_(model, torchq.codebook4_weight_only("even16", block_size=32))
    w = model[0].weight
    assert type(w).__name__ == "Codebook4Tensor" and w.scheme == "even16", w
    assert w.kernel == "cpu.even16" and w.quant_layout == "cpu_codebook4_tile16.even16", (w.kernel, w.quant_layout)
    # the weight is exactly table[code] * block scale
    codes, scale = w.codes(), w.block_scales()
    table = torch.tensor(values, dtype=torch.float32)
    want = (table[codes.long()].reshape(40, -1, 32) * scale.unsqueeze(-1)).reshape(40, -1)[:, :96]
    assert torch.equal(w.dequantize(), want)
    # 3. the fused C++ kernel equals the plain-PyTorch reference, and it is close to float
    with torch.no_grad():
        y = model(x)
        y_ref = F.linear(F.silu(F.linear(x, model[0].weight.dequantize(), model[0].bias)), model[2].weight.dequantize(), model[2].bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    sqnr = 20 * torch.log10(y_float.norm() / (y - y_float).norm())
    assert sqnr > 12, float(sqnr)
    text = torchq.explain(model, print_table=False)
    assert "cpu.even16" in text and "even16" in text
    # 4. checkpoints: safetensors and torch.load(weights_only=True), bit-exact outputs
    d = tempfile.mkdtemp()
    torchq.save_file(model.state_dict(), os.path.join(d, "m.safetensors"))
    buf = io.BytesIO(); torch.save(model.state_dict(), buf); buf.seek(0)
    for sd in (torchq.load_file(os.path.join(d, "m.safetensors")), torch.load(buf, weights_only=True)):
        fresh = nn.Sequential(nn.Linear(96, 40), nn.SiLU(), nn.Linear(40, 24))
        fresh.load_state_dict(sd, assign=True)
        with torch.no_grad():
            assert torch.equal(fresh(x), y)
    # config round trip, and a clear error for an unknown codebook
    cfg = torchq.codebook4_weight_only("even16", block_size=32)
    assert torchq.config_from_json(cfg.to_json()) == cfg
    try:
        torchq.codebook4_weight_only("nope")
    except ValueError as e:
        assert "register_codebook" in str(e)
    else:
        raise AssertionError("unknown codebook accepted")
    print("OK", report.summary())
    """
)


def test_a_codebook_format_registered_from_outside_gets_everything():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr


def test_register_codebook_rejects_bad_tables():
    import pytest

    from torchq.primitives.codebook import register_codebook

    with pytest.raises(ValueError, match="16 finite values"):
        register_codebook("short_table", [0.0, 1.0])
    with pytest.raises(ValueError, match="already registered"):
        register_codebook("nf4", [float(i) for i in range(16)])
    with pytest.raises(ValueError, match="identifier"):
        register_codebook("bad name", [float(i) for i in range(16)])
