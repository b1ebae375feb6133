"""nanochat's time-to-GPT-2 record (leaderboard Run 6, 2026): d24 at 8 tokens per scaling parameter on ClimbMix.

The 2026 model (sliding windows SSSL, value embeddings, smear, backout, per-layer scalars, q/k x1.2, RoPE base 100,000,
vocabulary padded to 64, the 2026 init) and optimizer (MuonEq, Polar Express, Muon+, NorMuon, cautious weight decay,
the 2026 AdamW groups and schedules), the batch from the model's size (2^20 tokens at d24) with the learning rates and
Muon's weight decay transferred to it, best-fit packing: nanochat-reference.md §1.3-§3.2, and
tests/test_reference_parity_2026.py holds jaxchat to the reference's code for all of it. fp8 training matmuls as the
record's --fp8, where the GPU has FP8 GEMMs (compute capability 8.9 and later; elsewhere the trainer says so and
computes in bf16); evaluation in bf16, as the reference.

    python -m jaxchat.config --config=configs/d24.py     # 1,384,122,122 parameters, 5,568 steps of 2^20 tokens
"""
from jaxchat.config import MODEL_2026, OPTIMIZER_2026, default_config


def get_config():
    c = default_config()
    c.update(depth=24, vocab_size=32768, device_batch_size=16, fp8=True, eval_tokens=80 * 524288)
    c.update(MODEL_2026)
    c.update(OPTIMIZER_2026)
    # horizon and batch: 8 tokens per scaling parameter; the 2026 batch rule (2^20 at d24), lrs and decay moved to it
    c.update(target_param_data_ratio=8.0, horizon_params="scaling", total_batch_size=0, batch_transfer=True)
    c.update(dataset="climbmix", packing="bestfit")
    return c
