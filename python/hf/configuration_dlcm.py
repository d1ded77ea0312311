"""transformers configuration of a dlcm DLCM export (`dlcm export --format hf`).

The model's own config.json object (SPEC 9 keys, the "train" object included: its "seed" keys
the training boundary samples) is kept whole under the key "dlcm" and validated by the PyTorch
reference's config loader (dlcm_ref_config.py, a copy of python/dlcm_ref/config.py); the
transformers-standard attributes (vocab_size, hidden_size, ...) are derived from it.
"""
from transformers import PretrainedConfig

from .dlcm_ref_config import config_from_dict

# transformers-standard attributes that are functions of the "dlcm" object
_DERIVED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
            "tie_word_embeddings")


class DlcmConfig(PretrainedConfig):
    model_type = "dlcm"

    def __init__(self, dlcm=None, **kwargs):
        dlcm = dict(dlcm) if dlcm else {"arch": "dlcm"}
        cfg = config_from_dict(dlcm, "config.json: 'dlcm'")
        if not cfg.is_dlcm:
            raise ValueError("config.json: 'dlcm.arch' must be \"dlcm\" for DlcmConfig (a baseline "
                             f"exports as LlamaForCausalLM), got {cfg.arch!r}")
        for k in _DERIVED:
            kwargs.pop(k, None)
        kwargs.setdefault("use_cache", False)  # generation recomputes the causal forward
        super().__init__(bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
                         tie_word_embeddings=False, **kwargs)
        self.dlcm = dlcm
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_token
        self.num_hidden_layers = cfg.enc_layers + cfg.dec_layers
        self.num_attention_heads = cfg.n_heads
        self.max_position_embeddings = cfg.max_seq_len

    @property
    def dlcm_config(self):
        """The validated reference config (dlcm_ref Config: attribute access to SPEC keys)."""
        return config_from_dict(self.dlcm, "config.json: 'dlcm'")
