"""Tiny random transformers MoE models (2 layers, 4 experts, top-2), built from their config
classes, never downloaded: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and GPT-OSS."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    initializer_range=0.1,  # O(1) logits, so that 1e-4 relative to them means something
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
QWEN = dict(num_experts=4, moe_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[])
MODELS = {
    "mixtral": ("Mixtral", dict(num_local_experts=4)),
    "qwen2_moe": ("Qwen2Moe", dict(QWEN, shared_expert_intermediate_size=16)),
    "qwen3_moe": ("Qwen3Moe", dict(QWEN, head_dim=8)),
    "olmoe": ("Olmoe", dict(num_experts=4)),
    "deepseek_v3": (
        "DeepseekV3",
        dict(
            n_routed_experts=4,
            moe_intermediate_size=16,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,  # both layers MoE
            num_key_value_heads=4,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    ),
    "gpt_oss": ("GptOss", dict(num_local_experts=4, head_dim=8, sliding_window=8)),
}


def build(name: str, **overrides) -> torch.nn.Module:
    """The model ``name`` of :data:`MODELS` in eval mode, seeded (0), with config overrides."""
    prefix, kw = MODELS[name]
    cfg_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    torch.manual_seed(0)
    return model_cls(cfg_cls(**{**COMMON, **kw, **overrides})).eval()


def token_ids(seed: int = 0) -> torch.Tensor:
    """A [2, 9] batch of token ids past the special ones, seeded."""
    return torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    """Within rel of the tensor's magnitude (and rel elementwise)."""
    atol = rel * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rel, atol=atol, msg=lambda m: f"{what}: {m}")


# A script run in a fresh process without smoe: argv = root, names; loads root/<name> with plain
# transformers and saves {name: (experts_implementation, logits of root/ids.pt)} to root/plain.pt.
PLAIN_LOADER = """
import sys, torch
from transformers import AutoModelForCausalLM
root = sys.argv[1]
ids = torch.load(f"{root}/ids.pt")
out = {}
for name in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(f"{root}/{name}").eval()
    out[name] = (model.config._experts_implementation, model(ids).logits.detach())
assert "smoe" not in sys.modules, "the plain process imported smoe"
torch.save(out, f"{root}/plain.pt")
"""
