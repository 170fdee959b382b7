"""The Llama-family decoder, its HF config and HF checkpoint I/O (DESIGN §5).

    cfg = ModelConfig.from_model_dir(path)            # llama / qwen2 / qwen3 / mistral config.json
    model = build_model(cfg, device="meta")           # then fully_shard(...) if distributed
    model.to_empty(device=dev); load_hf_weights(model, path)
    logp_N = model(batch)                             # PackedBatch -> fp32 log-probs of its targets
    save_hf_checkpoint(full_state_dict, cfg, out_dir, tokenizer_dir=path)
"""
from fasttrain.model.config import ModelConfig, num_params
from fasttrain.model.decoder import CausalLM, build_model
from fasttrain.model.hf_checkpoint import load_hf_weights, resolve_model_source, save_hf_checkpoint

__all__ = [
    "CausalLM", "ModelConfig", "build_model", "load_hf_weights",
    "num_params", "resolve_model_source", "save_hf_checkpoint",
]
