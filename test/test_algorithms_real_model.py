"""Calibration algorithms on SmolLM2-135M (slow): each one is closer to the float model than
round-to-nearest with the same storage config on held-out text (KL; GPTQ and AWQ also by
perplexity, closing a stated part of the gap), and the calibrated model reloads bit-exact.

Measured here (4 windows, 8 x 128 calibration tokens, int4 g64, float 16.166, RTN 21.752,
RTN KL 0.397): GPTQ 17.55 (75 % of the gap, KL 0.14; version 2 defaults: act-order with
static groups and MSE clipping; version 1's measured 20.10, 30 %), AWQ 18.10 (65 %,
KL 0.15; n_grid=20), HQQ 20.43 (24 %, KL 0.355; the p=0.7 half-quadratic iteration was
21.85, -2 %), AutoRound (10 steps over all 8 items, lr 0.02) 18.14 (65 %, KL 0.129).
NF4 + GPTQ and SmoothQuant W8A8 (alpha 0.5 and "auto") against their own round-to-nearest: see
:func:`test_combination_beats_its_round_to_nearest`.

Small on purpose (a CI budget of minutes on 2 cores): 8 calibration windows of 128 tokens,
4 evaluation windows of 256 tokens, one thread. The full table (128 x 512 calibration
tokens, 24 windows) is ``benchmarks/bench_calibration.py``. The LM head (tied to the
embedding) stays float, as in the round-to-nearest baselines of ``test_real_model.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("gguf")

import torchq  # noqa: E402
from torchq.apps import eval as teval  # noqa: E402
from smollm2 import smollm2_path  # noqa: E402
from torchq.interop.gguf import GGUFFile  # noqa: E402
from torchq.interop.model_io import load_model, save_quantized  # noqa: E402

INT4_G64 = torchq.int4_weight_only(group_size=64)


@pytest.fixture(scope="module")
def smol():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls on a shared 2-core host: one thread is faster
    f = GGUFFile(smollm2_path())
    tok = f.tokenizer()
    fp32, _ = f.model(keep_quantized=False)
    windows = teval.token_windows(tok, teval.default_text(), 256, 4)
    calib = torchq.calibration_data(tok, n_samples=8, seq_len=128)
    rtn = copy.deepcopy(fp32)
    torchq.quantize_(rtn, INT4_G64, filter_fn=lambda m, n: n != "lm_head")
    ref = teval.ReferenceLogProbs(fp32, windows, batch_size=4, progress=False)
    rtn_result = teval.evaluate(rtn, windows, ref, batch_size=4, progress=False)
    yield dict(
        fp32=fp32, tok=tok, windows=windows, calib=calib, ref=ref,
        float_ppl=teval.evaluate(fp32, windows, batch_size=4, progress=False).perplexity,
        rtn_ppl=rtn_result.perplexity, rtn_kl=rtn_result.kl,
    )
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "cfg,min_gap_closed",
    [
        (torchq.GPTQ(INT4_G64), 0.5),  # measured 75 %
        (torchq.AWQ(INT4_G64, n_grid=10), 0.3),
        (torchq.HQQ(INT4_G64), 0.15),  # p=3 search; the paper's p=0.7 iteration measured -2 % here
        # every item in every step (batch 8 of 8): measured 18.14, 65 % (KL 0.129), ~2 min at 1 thread;
        # iters=10 at the default lr (1/iters) with batches of 4 of the 8 measured 27.4, worse than RTN:
        # the best step is chosen by the loss of a random batch, too noisy at this size
        (torchq.AutoRound(INT4_G64, iters=10, batch_size=8, lr=0.02), 0.4),
    ],
    ids=lambda c: c.type_name if hasattr(c, "type_name") else str(c),
)
def test_algorithm_beats_round_to_nearest_and_reloads(smol, cfg, min_gap_closed, tmp_path):
    model = copy.deepcopy(smol["fp32"])
    torchq.quantize_(model, cfg, calibration=smol["calib"], filter_fn=lambda m, n: n != "lm_head")
    result = teval.evaluate(model, smol["windows"], smol["ref"], batch_size=4, progress=False)
    ppl = result.perplexity
    gap = (smol["rtn_ppl"] - ppl) / (smol["rtn_ppl"] - smol["float_ppl"])
    print(f"{cfg.type_name}: perplexity {ppl:.3f} KL {result.kl:.4f} (float {smol['float_ppl']:.3f}, "
          f"RTN {smol['rtn_ppl']:.3f} KL {smol['rtn_kl']:.4f}, gap closed {gap:.0%})")
    assert result.kl < smol["rtn_kl"], (result.kl, smol["rtn_kl"])
    assert gap >= min_gap_closed, (ppl, smol["rtn_ppl"], smol["float_ppl"])
    out = str(tmp_path / "saved")
    save_quantized(model, smol["tok"], out, quant_config=cfg)
    reloaded = load_model(out).model
    ids = smol["windows"][:1, :32]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def SmoothQuantAuto(base):
    return torchq.SmoothQuant(base, alpha="auto")


def _rtn_and_algo(smol, base, cfg):
    out = []
    for c, calib in ((base, None), (cfg, smol["calib"])):
        model = copy.deepcopy(smol["fp32"])
        torchq.quantize_(model, c, calibration=calib, filter_fn=lambda m, n: n != "lm_head")
        out.append(teval.evaluate(model, smol["windows"], smol["ref"], batch_size=4, progress=False))
    return out


@pytest.mark.parametrize(
    "base,wrap,ppl_slack,kl_ratio",
    [
        # NF4 + GPTQ beats NF4 round-to-nearest (measured 18.37 / KL 0.168 vs 21.40 / KL 0.322)
        (torchq.nf4_weight_only(block_size=64), torchq.GPTQ, 1.0, 0.7),
        # SmoothQuant W8A8 vs W8A8 (measured KL 0.0153 vs 0.0413; perplexity 16.383 vs 16.343,
        # float 16.166: a 0.25 % difference, within 4 windows' noise, where KL is not)
        (torchq.int8_dynamic_activation_int8_weight(), torchq.SmoothQuant, 1.005, 0.6),
        # alpha="auto": measured 16.241, KL 0.0110: below W8A8 in perplexity too
        (torchq.int8_dynamic_activation_int8_weight(), SmoothQuantAuto, 1.0, 0.6),
    ],
    ids=["nf4_gptq", "w8a8_smoothquant", "w8a8_smoothquant_auto"],
)
def test_combination_beats_its_round_to_nearest(smol, base, wrap, ppl_slack, kl_ratio):
    rtn, alg = _rtn_and_algo(smol, base, wrap(base))
    print(f"{wrap.__name__}({base.type_name}): perplexity {alg.perplexity:.3f} KL {alg.kl:.4f}; "
          f"round to nearest {rtn.perplexity:.3f} KL {rtn.kl:.4f}")
    assert alg.kl < kl_ratio * rtn.kl, (alg.kl, rtn.kl)
    assert alg.perplexity <= ppl_slack * rtn.perplexity, (alg.perplexity, rtn.perplexity)
