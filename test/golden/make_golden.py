"""Write the golden checkpoints of this torchq version: one tiny model per scheme, saved with
torchq.save_file (safetensors) and torch.save, plus the dequantized weights and outputs they
must reproduce (``expected.safetensors``).

    PYTHONPATH=. python test/golden/make_golden.py          # from the repository root

Files go to ``test/golden/<container>-v<version>/`` named after the formats' versions. An
existing folder is never rewritten (the script refuses): a new format version adds a folder,
so checkpoints written by every earlier torchq keep loading in CI.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

import torchq
from torchq.formats.serialization import CONTAINER_VERSION
from torchq.formats.affine.tensor import FORMAT_VERSION as AFFINE_VERSION
from torchq.formats.codebook4.tensor import FORMAT_VERSION as CODEBOOK_VERSION

SCHEMES = {
    "int4_g32": lambda: torchq.int4_weight_only(group_size=32),
    "int4_g64_padded_float_zero": lambda: torchq.int4_weight_only(group_size=64, zero_point_domain="float"),
    "int4_sym": lambda: torchq.int4_weight_only(group_size=32, symmetric=True),
    "int8": lambda: torchq.int8_weight_only(),
    "int3": lambda: torchq.intx_weight_only(bits=3, group_size=32),
    "w8a8": lambda: torchq.int8_dynamic_activation_int8_weight(),
    "w4a8": lambda: torchq.int8_dynamic_activation_int4_weight(group_size=32),
    "nf4": lambda: torchq.nf4_weight_only(block_size=32),
    "nf4_dq": lambda: torchq.nf4_weight_only(block_size=32, double_quant=True),
    "fp4_e2m1": lambda: torchq.fp4_weight_only(block_size=32),
    "fp4_bnb": lambda: torchq.fp4_weight_only(variant="bnb", block_size=32),
}
FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      f"container-v{CONTAINER_VERSION}-affine-v{AFFINE_VERSION}-codebook4-v{CODEBOOK_VERSION}")


def tiny_model() -> nn.Module:
    """The float model every golden checkpoint quantizes (K=40 pads at group 64)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 40), nn.SiLU(), nn.Linear(40, 24, bias=False))


def golden_input() -> torch.Tensor:
    return torch.randn(5, 64, generator=torch.Generator().manual_seed(1))


def main() -> None:
    if os.path.exists(FOLDER):
        sys.exit(f"{FOLDER} exists: golden files are never rewritten (a new format version gets a new folder)")
    os.makedirs(FOLDER)
    expected = {"input": golden_input()}
    for name, make in SCHEMES.items():
        model = tiny_model()
        torchq.quantize_(model, make())
        sd = model.state_dict()
        torchq.save_file(sd, os.path.join(FOLDER, f"{name}.safetensors"))
        torch.save(sd, os.path.join(FOLDER, f"{name}.pt"))
        with torch.no_grad():
            expected[f"{name}.output"] = model(expected["input"])
        for key, value in sd.items():
            if hasattr(value, "dequantize"):
                expected[f"{name}.{key}.dequantized"] = value.dequantize()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(FOLDER, "expected.safetensors"),
              metadata={"torchq": torchq.__version__, "torch": torch.__version__})
    print(f"wrote {len(SCHEMES)} schemes to {FOLDER}")


if __name__ == "__main__":
    main()
