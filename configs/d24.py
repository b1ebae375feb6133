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
from jaxchat.config import default_config


def get_config():
    c = default_config()
    c.depth = 24
    c.vocab_size = 32768
    c.device_batch_size = 16
    # model
    c.window_pattern = "SSSL"
    c.value_embeds = True
    c.smear = True
    c.backout = True
    c.layer_scalars = True
    c.qk_scale = 1.2
    c.rope_base = 100000.0
    c.rope_bf16 = False
    c.vocab_multiple = 64
    c.init = "2026"
    c.fp8 = True
    # horizon and batch
    c.target_param_data_ratio = 8.0
    c.horizon_params = "scaling"
    c.total_batch_size = 0  # the 2026 rule: 2^20 at d24
    c.batch_transfer = True
    # optimizer and schedules (base_train's 2026 defaults)
    c.optimizer = "2026"
    c.embedding_lr = 0.3
    c.unembedding_lr = 0.008
    c.matrix_lr = 0.02
    c.scalar_lr = 0.5
    c.grad_clip = 0.0
    c.muon_coefficients = "polar_express"
    c.muon_equilibrate = True
    c.muon_plus = True
    c.muon_normuon_beta2 = 0.9
    c.muon_weight_decay = 0.28
    c.muon_momentum_start = 0.85
    c.muon_momentum_end = 0.97
    c.muon_momentum_warmup = 400
    c.muon_momentum_final = 0.90
    c.warmup_steps = 40
    c.warmdown_ratio = 0.65
    c.final_lr_frac = 0.05
    c.eval_tokens = 80 * 524288
    # data
    c.dataset = "climbmix"
    c.packing = "bestfit"
    return c
