# Sourced by the packaging checks: writes a small corpus and a tiny DLCM config into $WORK
# (corpus.txt, cfg.json), the shapes tests/test_tools_cli.cpp trains.
mkdir -p "$WORK"
python3 - "$WORK" <<'PY'
import json, random, sys
w = sys.argv[1]
r = random.Random(3)
words = "the concept model reads tokens and writes text".split()
with open(w + "/corpus.txt", "w") as f:
    for d in range(120):
        f.write(" ".join(r.choice(words) for _ in range(6 + r.randrange(20))) + ".\n\f")
cfg = {"arch": "dlcm", "vocab_size": 260, "d_token": 16, "n_heads": 2, "n_kv_heads": 1,
       "head_dim": 8, "d_ff": 32, "max_seq_len": 32, "enc_layers": 1, "dec_layers": 1,
       "d_concept": 24, "bb_layers": 1, "bb_heads": 2, "bb_kv_heads": 2, "bb_d_ff": 48,
       "x_heads": 2, "x_kv_heads": 1, "x_d_ff": 32,
       "train": {"seq_len": 32, "batch_size": 2, "steps": 6, "warmup_steps": 0, "eval_every": 3,
                 "eval_batches": 1, "ckpt_every": 0, "log_every": 2, "threads": 1}}
json.dump(cfg, open(w + "/cfg.json", "w"))
PY
