"""Long-running fuzzer for torchq's checkpoint loaders (atheris, coverage-guided).

    pip install atheris
    python test/fuzz/fuzz_load_file.py -atheris_runs=200000          # safetensors (torchq.load_file)
    python test/fuzz/fuzz_load_file.py -atheris_runs=50000 --torch    # torch.load(weights_only=True)

Seeds are real small checkpoints of every scheme (written at start). A run passes when every
input either loads bit-exact or raises torchq.CheckpointError; anything else (another
exception type, a crash, a changed weight) is a finding: atheris saves the input as
``crash-*``; turn it into a regression test in test/test_hostile_inputs.py. Under
AddressSanitizer: TORCHQ_SANITIZE=1 LD_PRELOAD="$(gcc -print-file-name=libasan.so)"
ASAN_OPTIONS=detect_leaks=0 python test/fuzz/fuzz_load_file.py ...
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import torch

    import torchq
    from torchq import CheckpointError

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_hostile_inputs import SCHEMES, model, same_state  # noqa: E402

TORCH_MODE = "--torch" in sys.argv
if TORCH_MODE:
    sys.argv.remove("--torch")
ORIGINALS: list[dict] = []
SEEDS: list[bytes] = []
TMP = tempfile.mkdtemp()


def _seed() -> None:
    for scheme in SCHEMES:
        sd = model(scheme).state_dict()
        ORIGINALS.append(sd)
        if TORCH_MODE:
            buf = io.BytesIO()
            torch.save(sd, buf)
            SEEDS.append(buf.getvalue())
        else:
            path = os.path.join(TMP, f"{scheme}.safetensors")
            torchq.save_file(sd, path)
            SEEDS.append(open(path, "rb").read())


def test_one_input(data: bytes) -> None:
    if TORCH_MODE:
        try:
            loaded = torch.load(io.BytesIO(data), weights_only=True)
        except CheckpointError:
            return
        except Exception:  # noqa: BLE001 - torch's own zip/pickle errors for a non-checkpoint are fine
            return
    else:
        path = os.path.join(TMP, "input.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        try:
            loaded = torchq.load_file(path)
        except CheckpointError:
            return
    if not any(same_state(loaded, sd) for sd in ORIGINALS):
        # a file the fuzzer built from scratch may be a *valid* checkpoint: then it must rebuild cleanly
        for value in loaded.values():
            if hasattr(value, "dequantize"):
                value.dequantize()


if __name__ == "__main__":
    _seed()
    corpus = os.path.join(TMP, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for i, blob in enumerate(SEEDS):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(blob)
    atheris.Setup(sys.argv + [corpus], test_one_input)
    atheris.Fuzz()
