"""Model configuration (mirrors src/models/config.h; config.json = SPEC section 9 keys plus
"xattn_impl", "init_std", "mup", a "train" object and the SPEC 4.9 research variants
"concept_repr", "concept_visibility", "enc_window", "dec_window", "concept_path", "xattn_rope", and the
controls "router.kind" = fixed | word with "router.stride", "aux_kind", "smoother",
"baseline_extras" and "n_layers_pre").
Unknown keys are ignored with a warning."""
import copy
import json
import sys

DEFAULTS = {
    "arch": "baseline",
    "vocab_size": 4096,
    "d_token": 256,
    "n_heads": 4,
    "n_kv_heads": 4,
    "head_dim": 64,
    "d_ff": 768,
    "n_layers": 4,
    # baseline control: the DLCM's token-path extras after layer n_layers_pre (0 = n_layers // 2)
    "baseline_extras": False,
    "n_layers_pre": 0,
    "enc_layers": 2,
    "dec_layers": 2,
    "d_concept": 384,
    "bb_layers": 4,
    "bb_heads": 6,
    "bb_kv_heads": 6,
    "bb_d_ff": 1152,
    "x_heads": 4,
    "x_kv_heads": 4,
    "x_d_ff": 768,
    "d_scan": 0,
    # kind: "projected" | "raw" (learned) | "fixed" (every `stride` tokens) | "word" (rules)
    "router": {"kind": "projected", "stride": 4, "alpha": 0.1, "tau": 0.5, "smooth_grad": False},
    "target_R": 4.0,
    "aux_weight": 0.03,
    "aux_kind": "global",   # "global" (Global Parser over the step) | "sequence" (per row, averaged)
    "smoother": True,       # False: zs_j = z_j
    "xattn_impl": "compact",
    "qk_norm": False,
    "rope_theta": 10000.0,
    "norm_eps": 1e-5,
    "logit_mult": 1.0,
    "max_seq_len": 512,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": 0,
    "init_std": 0.02,
    "mup": {"enabled": False, "d_base": 64, "sigma_base": 0.02,
            "lr_mult_token": 1.0, "lr_mult_concept": 1.0, "lr_mult_other": 1.0},
    "train": {},
    # SPEC 4.9 research variants (dlcm only; these defaults are the SPEC 4 model)
    "concept_repr": "mean",           # "mean" | "first" | "prefix_mean"
    "concept_visibility": "shifted",  # "shifted" | "inclusive"
    "enc_window": 0,                  # sliding-window width of encoder self-attention, 0 = full
    "dec_window": 0,                  # same for the decoder blocks
    "concept_path": True,             # false: no pooling/backbone/cross-attention term (Psi = H)
    "xattn_rope": False,              # RoPE in the concept cross-attention (docs/dlcm.md)
}


class Config(dict):
    """A dict with attribute access; nested dicts (router, mup, train) stay plain dicts."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e

    @property
    def scan_dim(self):
        return self["d_scan"] if self["d_scan"] > 0 else self["d_token"]

    @property
    def is_dlcm(self):
        return self["arch"] == "dlcm"

    @property
    def rule_router(self):
        return self["router"]["kind"] in ("fixed", "word")

    @property
    def layers_pre(self):
        return self["n_layers_pre"] if self["n_layers_pre"] > 0 else self["n_layers"] // 2


def config_from_dict(src, source="config"):
    c = copy.deepcopy(DEFAULTS)
    for k, v in src.items():
        if k not in c:
            print(f"{source}: warning: ignoring unknown config key '{k}'", file=sys.stderr)
            continue
        if isinstance(c[k], dict) and k != "train":
            for kk, vv in v.items():
                if kk not in c[k]:
                    print(f"{source}: warning: ignoring unknown config key '{k}.{kk}'", file=sys.stderr)
                    continue
                c[k][kk] = vv
        else:
            c[k] = v
    cfg = Config(c)
    if cfg.arch not in ("baseline", "dlcm"):
        raise ValueError(f"{source}: 'arch' must be baseline or dlcm, got {cfg.arch!r}")
    if cfg.head_dim % 2:
        raise ValueError(f"{source}: 'head_dim' must be even")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"{source}: 'n_kv_heads' must divide 'n_heads'")
    if not cfg.is_dlcm and cfg.baseline_extras and not 1 <= cfg.layers_pre < cfg.n_layers:
        raise ValueError(f"{source}: 'n_layers_pre' must lie in [1, n_layers - 1] with "
                         f"baseline_extras, got {cfg.layers_pre}")
    if cfg.is_dlcm:
        if cfg.bb_heads % cfg.bb_kv_heads or cfg.x_heads % cfg.x_kv_heads:
            raise ValueError(f"{source}: kv heads must divide heads")
        if cfg.router["kind"] not in ("projected", "raw", "fixed", "word"):
            raise ValueError(f"{source}: 'router.kind' must be projected, raw, fixed or word")
        if cfg.router["stride"] < 1:
            raise ValueError(f"{source}: 'router.stride' must be >= 1")
        if cfg.rule_router and cfg.router["smooth_grad"]:
            raise ValueError(f"{source}: 'router.smooth_grad' needs a learned router")
        if cfg.aux_kind not in ("global", "sequence"):
            raise ValueError(f"{source}: 'aux_kind' must be global or sequence, got {cfg.aux_kind!r}")
        if cfg.concept_repr not in ("mean", "first", "prefix_mean"):
            raise ValueError(f"{source}: 'concept_repr' must be mean, first or prefix_mean, "
                             f"got {cfg.concept_repr!r}")
        if cfg.concept_visibility not in ("shifted", "inclusive"):
            raise ValueError(f"{source}: 'concept_visibility' must be shifted or inclusive, "
                             f"got {cfg.concept_visibility!r}")
        if cfg.concept_visibility == "inclusive" and cfg.concept_repr == "mean":
            raise ValueError(f"{source}: 'concept_visibility' = inclusive with 'concept_repr' = mean "
                             "lets a token see the mean of its whole concept, i.e. future tokens; "
                             "use concept_repr first or prefix_mean (SPEC 4.9)")
        for k in ("enc_window", "dec_window"):
            if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 0:
                raise ValueError(f"{source}: '{k}' must be an integer >= 0 (0 = full causal "
                                 f"attention), got {cfg[k]!r}")
        if not isinstance(cfg.xattn_rope, bool):
            raise ValueError(f"{source}: 'xattn_rope' must be true or false, got {cfg.xattn_rope!r}")
        if not isinstance(cfg.concept_path, bool):
            raise ValueError(f"{source}: 'concept_path' must be true or false, got {cfg.concept_path!r}")
    return cfg


def load_config(path):
    with open(path) as f:
        return config_from_dict(json.load(f), path)
