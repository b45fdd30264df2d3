"""``torchq quantize ... --algo NAME --calib-samples N`` on a tiny GGUF llama."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("gguf")

import torchq  # noqa: E402
from torchq.apps import cli  # noqa: E402
from torchq.quantize.configs import config_from_dict  # noqa: E402
from torchq.interop.model_io import load_model  # noqa: E402

from gguf_fixtures import tiny  # noqa: E402,F401  (fixture)


def test_quantize_with_gptq_writes_a_checkpoint_that_reloads(tiny, tmp_path, capsys):
    out = str(tmp_path / "gptq")
    args = ["quantize", tiny, out, "--scheme", "int4", "--group-size", "32", "--algo", "gptq", "--calib-samples", "4",
            "--calib-seq-len", "16"]
    assert cli.main(args) == 0
    assert '"type": "gptq"' in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:
        recorded = json.load(f)
    cfg = next(v["quant_config"] for v in recorded.values() if isinstance(v, dict) and "quant_config" in v)
    assert config_from_dict(cfg) == torchq.GPTQ(torchq.int4_weight_only(group_size=32))
    model = load_model(out).model
    w = model.model.layers[0].mlp.down_proj.weight
    assert isinstance(w, torchq.AffineQuantizedTensor)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_algo_errors(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--algo needs --scheme"):
        cli.main(["quantize", tiny, str(tmp_path / "o"), "--algo", "gptq"])
    assert cli.main(["quantize", tiny, str(tmp_path / "o"), "--scheme", "int4", "--algo", "smoothquant"]) == 2
    assert "valid base configs are w4a8, w8a8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["quantize", tiny, str(tmp_path / "o"), "--scheme", "int4", "--algo", "nope"])
