"""The `torchq` command line and the scheme vocabulary, on a tiny GGUF llama."""

from __future__ import annotations

import copy
import os
import tomllib

import pytest
import torch

pytest.importorskip("gguf")

import torchq  # noqa: E402
from torchq.apps import cli  # noqa: E402
from torchq.quantize.schemes import config_from_scheme, scheme_names  # noqa: E402

SCHEME_NAMES = tuple(scheme_names())
from torchq.interop.model_io import is_torchq_dir, load_model, model_size_bytes  # noqa: E402

from gguf_fixtures import tiny  # noqa: E402,F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ids():
    return torch.randint(0, 258, (2, 23), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


# ---------------------------------------------------------------------- vocabulary
def test_vocabulary_is_exact():
    assert SCHEME_NAMES == ("int8", "int4", "w8a8", "w4a8", "nf4", "fp4_e2m1", "fp4_e2m1_bnb")
    assert config_from_scheme("int4", 64) == torchq.int4_weight_only(group_size=64)
    assert config_from_scheme("int8") == torchq.int8_weight_only()
    assert config_from_scheme("int8", 32) == torchq.int8_weight_only(group_size=32)
    assert config_from_scheme("w8a8") == torchq.int8_dynamic_activation_int8_weight()
    assert config_from_scheme("w4a8", 32) == torchq.int8_dynamic_activation_int4_weight(group_size=32)
    for bad in ("fp4", "INT4", "int", "int4 ", "nf4x"):
        with pytest.raises(ValueError, match="valid schemes: int8, int4, w8a8, w4a8, nf4, fp4_e2m1, fp4_e2m1_bnb"):
            config_from_scheme(bad)
    with pytest.raises(ValueError, match="takes no group size"):
        config_from_scheme("w8a8", 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        config_from_scheme("int4", 48)


# ---------------------------------------------------------------------- argument parsing
def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("quantize", "eval", "bench", "examples:", "model source", *SCHEME_NAMES):
        assert word in out
    for sub in ("quantize", "eval", "bench"):
        with pytest.raises(SystemExit):
            cli.main([sub, "--help"])
        assert "--scheme" in capsys.readouterr().out


def test_unknown_scheme_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "x.gguf", "out", "--scheme", "fp4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown scheme 'fp4'" in err and "fp4_e2m1, fp4_e2m1_bnb" in err


def test_clear_errors(tiny, tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert "neither a .gguf file nor a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--scheme is required"):
        cli.main(["quantize", str(tmp_path), str(tmp_path / "o")])


def test_console_script_entry_point():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"torchq": "torchq.apps.cli:main"}


# ---------------------------------------------------------------------- commands
def test_quantize_gguf_lossless_import_reloads_bit_exact(tiny, tmp_path, capsys):
    out = str(tmp_path / "imported")
    assert cli.main(["quantize", tiny, out]) == 0
    printed = capsys.readouterr().out
    assert "Q4_1 linear -> int4_weight_only" in printed and "saved" in printed
    assert is_torchq_dir(out)
    direct = torchq.load_gguf(tiny)
    loaded = load_model(out)
    assert loaded.kind == "torchq"
    assert torch.equal(_logits(loaded.model), _logits(direct))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert model_size_bytes(loaded.model) == model_size_bytes(direct)


@pytest.mark.parametrize("scheme,group", [("int4", "32"), ("w8a8", None)])
def test_quantize_scheme_from_gguf_and_from_transformers_dir(tiny, tmp_path, scheme, group):
    float_model = load_model(tiny, keep_quantized=False)
    hf_dir = str(tmp_path / "hf")
    float_model.model.save_pretrained(hf_dir)
    float_model.tokenizer.save_pretrained(hf_dir)
    expected = copy.deepcopy(float_model.model)
    torchq.quantize_(expected, config_from_scheme(scheme, int(group) if group else None))
    extra = ["--group-size", group] if group else []
    for source in (tiny, hf_dir):
        out = str(tmp_path / f"q-{os.path.basename(source)}")  # a directory named *.gguf is still a directory
        assert cli.main(["quantize", source, out, "--scheme", scheme, *extra]) == 0
        reloaded = load_model(out).model
        assert torch.equal(_logits(reloaded), _logits(expected)), source
        assert isinstance(reloaded.model.layers[0].mlp.up_proj.weight, torchq.AffineQuantizedTensor)


def test_eval_and_bench_commands(tiny, tmp_path, capsys):
    assert cli.main(["eval", tiny, "--scheme", "int8", "--windows", "2", "--window", "32"]) == 0
    out = capsys.readouterr().out
    assert "2 windows of 32 tokens" in out and "perplexity" in out and "KL" in out
    assert cli.main(["eval", tiny, "--reference", tiny, "--windows", "2", "--window", "32", "--text", __file__]) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    assert cli.main(["bench", tiny, "--scheme", "w4a8", "--group-size", "32", "--prompt-tokens", "16",
                     "--new-tokens", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "decode" in out and "peak RSS" in out and "sample:" in out
