"""Golden checkpoints written by earlier torchq versions (test/golden/<format versions>/) still
load, through safetensors and torch.load(weights_only=True), with bit-identical weights and
the same outputs: a change that breaks old checkpoints fails here. New format versions add
folders (test/golden/make_golden.py refuses to rewrite one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as load_plain

import torchq

GOLDEN = Path(__file__).resolve().parent / "golden"
FOLDERS = sorted(p for p in GOLDEN.iterdir() if p.is_dir())
_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

CASES = [(folder, path.stem, kind) for folder in FOLDERS for path in sorted(folder.glob("*.pt"))
         for kind in ("safetensors", "pt")]


def test_there_are_golden_files_of_every_scheme():
    assert FOLDERS, "no golden folders"
    for folder in FOLDERS:
        assert {p.stem for p in folder.glob("*.pt")} == {p.stem for p in folder.glob("*.safetensors")} - {"expected"}
    newest = {p.stem for p in FOLDERS[-1].glob("*.pt")}
    assert newest >= set(make_golden.SCHEMES), "a scheme without golden files"


@pytest.mark.parametrize("folder,scheme,kind", CASES, ids=[f"{f.name}/{s}.{k}" for f, s, k in CASES])
def test_golden_checkpoint_loads_bit_exact(folder, scheme, kind):
    expected = load_plain(str(folder / "expected.safetensors"))
    if kind == "safetensors":
        sd = torchq.load_file(str(folder / f"{scheme}.safetensors"))
    else:
        sd = torch.load(folder / f"{scheme}.pt", weights_only=True)
    model = make_golden.tiny_model()
    model.load_state_dict(sd, assign=True)
    for key, value in sd.items():
        if hasattr(value, "dequantize"):
            want = expected[f"{scheme}.{key}.dequantized"]
            got = value.dequantize()
            assert got.dtype == want.dtype and torch.equal(got.view(torch.int32), want.view(torch.int32)), key
    with torch.no_grad():
        y = model(expected["input"])
    # kernels may sum in another order on another CPU: fp32 tolerance, not bits
    torch.testing.assert_close(y, expected[f"{scheme}.output"], rtol=1e-5, atol=1e-5)


def test_make_golden_never_rewrites_a_folder(monkeypatch, tmp_path):
    existing = tmp_path / "v"
    existing.mkdir()
    monkeypatch.setattr(make_golden, "FOLDER", str(existing))
    with pytest.raises(SystemExit, match="never rewritten"):
        make_golden.main()
