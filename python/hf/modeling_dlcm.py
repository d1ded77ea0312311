"""transformers remote code for a dlcm DLCM (`dlcm export --format hf`, SPEC section 4).

The mathematics is the PyTorch float32 reference itself: dlcm_ref_model.py is a copy of
python/dlcm_ref/model.py written by the export, and this file only wraps it in a
PreTrainedModel. Parameters carry the SPEC-9 tensor names, so model.safetensors is the
checkpoint's own tensors.

Inference (model.eval()): boundaries b = [p >= tau] (router.tau of the "dlcm" config object).
`generate` recomputes the whole causal forward at every step (no cache): the DLCM is causal by
construction (SPEC 4.7), so the logits of a prefix never depend on later tokens.

Training (model.train()): b ~ Bernoulli(sigmoid(logit(p) / alpha)) drawn with the engine's
counter RNG keyed by (train.seed, step, global row, position), and the loss
CE + aux_weight * L_aux with the Global Parser's F and G over the whole optimizer step: every
micro-batch and every torch.distributed rank. F must be known before the first backward, so
a step is *prepared* first: `dlcm_prepare_step(micro_batches, step)` runs the encoder and the
router once per micro-batch (no gradient), draws the step's samples, and all-reduces the counts
(boundaries, positions, target tokens, rows) over the process group when one is initialised.
Each training forward then takes the next prepared micro-batch and returns its share of the
step loss, scaled so that

  * the shares of a step's micro-batches sum to the step loss (no division by the number of
    accumulation steps: gradients accumulated over k micro-batches equal one batch k times
    larger, with the same samples), and
  * with W ranks each share is multiplied by W, so DDP/FSDP's gradient averaging yields the
    gradient of the global step loss.

`dlcm_trainer_class()` returns a transformers.Trainer subclass that prepares every step from
the micro-batches the Trainer prefetches. Without a prepared step (a plain Trainer with
gradient_accumulation_steps = 1, or your own loop), each training forward prepares a one-micro-
batch step by itself. After each step `model.dlcm_last` holds F, G, CE, aux and the realised
compression 1/F of that step.
"""
import contextlib
import json

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_dlcm import DlcmConfig
from .dlcm_ref_model import (dlcm_forward, encode_and_route, global_parser_loss, param_specs,
                             rule_boundaries, sample_boundaries)

# The cross-attention in its replicate form (SPEC 4.7): the same function as compact, and the
# reference computes it with whole-tensor operations (compact builds its bias element by element).
_XATTN = "replicate"
_ENGINE_DEFAULT_SEED = 1234  # train.seed when the checkpoint's config has none
# generate() and the Trainer pass these; the full causal forward needs none of them
_IGNORED_KWARGS = ("num_items_in_batch", "use_cache", "past_key_values", "cache_position",
                   "output_attentions", "output_hidden_states")


def _dist():
    """(world size, rank) of the default torch.distributed process group, (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _all_reduce(values, device):
    """Sums a list of floats over the process group (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _dist()[0] > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _device_scope(device):
    """The reference creates its masks, positions and RoPE tables without a device argument:
    torch >= 2 routes them to the inputs' device; torch 1.x runs this model on the CPU only."""
    if device.type == "cpu":
        return contextlib.nullcontext()
    if not hasattr(torch.device, "__enter__"):
        raise RuntimeError(f"DlcmForCausalLM on {device} needs torch >= 2.0 (found {torch.__version__}); "
                           "use the CPU or a newer torch")
    return device


def _targets_from_labels(labels):
    """HF labels (the input ids, -100 = ignore) -> SPEC targets: targets[:, t] = labels[:, t+1],
    the last position and every negative label ignored (-1)."""
    t = torch.full_like(labels, -1)
    t[:, :-1] = labels[:, 1:]
    return torch.where(t < 0, torch.full_like(t, -1), t)


def _forced(cfg, tokens):
    forced = tokens == cfg.bos_id
    forced[:, 0] = True
    return forced


class DlcmPreTrainedModel(PreTrainedModel):
    config_class = DlcmConfig
    base_model_prefix = "dlcm"  # no SPEC tensor name starts with it: checkpoint keys load as they are
    supports_gradient_checkpointing = False
    _no_split_modules = []

    def _init_weights(self, module):
        """Reference init (python/dlcm_ref init_params): matrices, embeddings and vectors
        ~ N(0, init_std), norms 1, router projections I. Only for a model built from a config
        (from_config) or tensors missing from a checkpoint; not the engine's µP init."""
        kinds = getattr(module, "_dlcm_kinds", None)
        if not kinds:
            return
        std = float(self.config.dlcm_config.init_std)
        for leaf, kind in kinds.items():
            w = getattr(module, leaf)
            with torch.no_grad():
                if kind == "norm":
                    nn.init.ones_(w)
                elif kind == "identity":
                    w.copy_(torch.eye(w.shape[0], w.shape[1], dtype=w.dtype))
                else:
                    nn.init.normal_(w, mean=0.0, std=std)


class DlcmForCausalLM(DlcmPreTrainedModel, GenerationMixin):
    # save_pretrained copies this file and the ones it imports and keeps config.json's auto_map,
    # so a saved model loads with trust_remote_code like the export (transformers registers a
    # remote-code model class for that only when it comes from the Hub)
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config):
        super().__init__(config)
        self._cfg_key = None
        cfg = self._cfg
        for name, shape, kind in param_specs(cfg):
            self._add_param(name, shape, kind)
        self.dlcm_step = 0      # the step that the next prepared step draws its samples for
        self._prepared = None   # the prepared step (dlcm_prepare_step)
        self.dlcm_last = {}     # F, G, ce, aux, loss, compression of the last completed step
        self.post_init()

    @property
    def _cfg(self):
        """The reference config of config.dlcm, re-read when that object changes, so that an edit
        such as model.config.dlcm["router"]["tau"] = 0.4 applies from the next forward."""
        key = json.dumps(self.config.dlcm, sort_keys=True)
        if key != self._cfg_key:
            cfg = self.config.dlcm_config
            if cfg.router["kind"] == "word":
                raise ValueError("config.json: router.kind = \"word\" needs the tokenizer's "
                                 "word-start table, which this remote code does not carry; export "
                                 "a model with a projected, raw or fixed router")
            self._cfg_cached, self._cfg_key = cfg, key
        return self._cfg_cached

    def _add_param(self, name, shape, kind):
        """Registers a SPEC-9 tensor under a module path equal to its name."""
        *path, leaf = name.split(".")
        if name == "tok_embeddings.weight":
            self.tok_embeddings = nn.Embedding(shape[0], shape[1])
            holder = self.tok_embeddings
        elif name == "lm_head.weight":
            self.lm_head = nn.Linear(shape[1], shape[0], bias=False)
            holder = self.lm_head
        else:
            holder = self
            for part in path:
                if part not in holder._modules:
                    holder.add_module(part, nn.Module())
                holder = holder._modules[part]
            holder.register_parameter(leaf, nn.Parameter(torch.empty(shape)))
        if not hasattr(holder, "_dlcm_kinds"):
            holder._dlcm_kinds = {}
        holder._dlcm_kinds[leaf] = kind

    def get_input_embeddings(self):
        return self.tok_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def _params(self):
        return dict(self.named_parameters())

    # ---- training steps ----------------------------------------------------------------------

    @torch.no_grad()
    def dlcm_prepare_step(self, micro_batches, step=None):
        """Prepares one optimizer step from its micro-batches, in the order the training forwards
        will see them: each a dict with "input_ids" [B, L], optional "labels" (HF convention)
        and optional "boundaries" [B, L] 0/1 (given samples; forced positions are added).
        step: the optimizer step that keys the boundary RNG (default: an internal counter).
        Draws the samples, and sums F's counts, the positions, the target tokens and the rows
        over all micro-batches and all ranks."""
        if not micro_batches:
            raise ValueError("dlcm_prepare_step: no micro-batches")
        cfg = self._cfg
        step = self.dlcm_step if step is None else int(step)
        seed = int(cfg["train"].get("seed", _ENGINE_DEFAULT_SEED))
        P = self._params()
        world, rank = _dist()
        first = micro_batches[0]["input_ids"]
        # global row of this rank's first row: the rows of the lower ranks come first (as in
        # the engine, where micro-batch k of rank r is micro-batch r*K + k of the step)
        rows_here = sum(int(mb["input_ids"].shape[0]) for mb in micro_batches)
        per_rank = [0.0] * world
        per_rank[rank] = float(rows_here)
        row0 = int(sum(_all_reduce(per_rank, first.device)[:rank]))
        bs, toks = [], []
        sum_b = positions = n_targets = 0.0
        with _device_scope(first.device):
            for mb in micro_batches:
                tokens = mb["input_ids"]
                forced = _forced(cfg, tokens)
                if cfg.rule_router:
                    b = rule_boundaries(cfg, tokens.cpu()).to(tokens.device) | forced
                elif mb.get("boundaries") is not None:
                    b = mb["boundaries"].to(torch.bool) | forced
                else:
                    _, p, forced = encode_and_route(P, cfg, tokens)
                    b = sample_boundaries(p, forced, cfg.router["alpha"], seed, step, row0)
                bs.append(b.cpu())
                toks.append(tokens.detach().cpu())
                sum_b += float(b.sum())
                positions += float(b.numel())
                if mb.get("labels") is not None:
                    n_targets += float((_targets_from_labels(mb["labels"]) >= 0).sum())
                row0 += int(tokens.shape[0])
        sum_b, positions, n_targets, rows = _all_reduce(
            [sum_b, positions, n_targets, float(rows_here)], first.device)
        self._prepared = {"step": step, "b": bs, "tokens": toks, "next": 0, "world": world,
                          "F": sum_b / positions, "positions": positions, "targets": n_targets,
                          "rows": rows, "sum_p": 0.0, "ce_sum": 0.0, "aux": 0.0}
        self.dlcm_step = step + 1

    def _claim(self, tokens, labels):
        """The prepared micro-batch for this training forward (preparing a one-micro-batch step
        when none is pending)."""
        st = self._prepared
        if st is None or st["next"] >= len(st["b"]):
            self.dlcm_prepare_step([{"input_ids": tokens, "labels": labels}])
            st = self._prepared
        k = st["next"]
        if not torch.equal(st["tokens"][k], tokens.detach().cpu()):
            raise ValueError(f"DlcmForCausalLM: training forward {k} of step {st['step']} got other "
                             f"input_ids than micro-batch {k} given to dlcm_prepare_step; prepare each "
                             "step with its micro-batches in the order they are run")
        st["next"] += 1
        return st, k

    def _train_forward(self, P, tokens, labels):
        cfg = self._cfg
        st, k = self._claim(tokens, labels)
        b = st["b"][k].to(tokens.device)
        targets = _targets_from_labels(labels) if labels is not None else None
        res = dlcm_forward(P, cfg, tokens, targets, b, _XATTN)
        R = float(cfg.target_R)
        N = st["positions"]
        p = res["p"]
        if cfg.rule_router:
            aux = p.sum() * 0.0
        elif cfg.aux_kind == "sequence":  # per-row losses averaged over all rows of the step
            aux = global_parser_loss(res["b"].mean(dim=1), p.mean(dim=1), R).sum() / st["rows"]
        else:
            # L_aux is affine in G for the step's F: L(F, G) = L(F, 0) + G (L(F, 1) - L(F, 0)),
            # G = sum of every micro-batch's sum(p) / N, so the shares sum to L_aux exactly.
            a0 = global_parser_loss(st["F"], 0.0, R)
            a1 = global_parser_loss(st["F"], 1.0, R)
            aux = (p.numel() / N) * a0 + p.sum() / N * (a1 - a0)
        loss = None
        if targets is not None:
            n_k = int((targets >= 0).sum())
            ce_part = res["ce"] * (n_k / max(st["targets"], 1.0))
            loss = st["world"] * (ce_part + cfg.aux_weight * aux)
            st["ce_sum"] += float(res["ce"].detach()) * n_k
        st["sum_p"] += float(p.detach().sum())
        st["aux"] += float(aux.detach())
        if st["next"] == len(st["b"]):
            self._finish_step(st, tokens.device)
        return res, loss

    def _finish_step(self, st, device):
        sum_p, ce_sum, aux = _all_reduce([st["sum_p"], st["ce_sum"], st["aux"]], device)
        F = st["F"]
        ce = ce_sum / max(st["targets"], 1.0)
        self.dlcm_last = {"step": st["step"], "F": F, "G": sum_p / st["positions"], "ce": ce,
                          "aux": aux, "loss": ce + self._cfg.aux_weight * aux,
                          "compression": 1.0 / F if F > 0 else 0.0}

    def dlcm_save_checkpoint(self, path):
        """Writes a dlcm checkpoint folder (the engine's side of the round trip): config.json =
        the "dlcm" config object, model.safetensors = every tensor under its SPEC-9 name in
        float32. Copy the original checkpoint's tokenizer files next to them for `dlcm generate`."""
        import os

        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in self.named_parameters()}
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.dlcm, f, indent=2)
            f.write("\n")

    # ---- forward and generation --------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, labels=None, boundaries=None,
                position_ids=None, return_dict=None, **loss_kwargs):
        """input_ids [B, L] (rows of packed documents, each document starting with BOS);
        labels: HF convention (shifted inside, -100 ignored); boundaries: optional [B, L] 0/1
        given concept starts (training with given samples, or teacher-forced evaluation).
        Training mode returns this micro-batch's share of the step loss (module docstring)."""
        unknown = sorted(k for k in loss_kwargs if k not in _IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"DlcmForCausalLM.forward: unexpected arguments {unknown}")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("DlcmForCausalLM.forward needs input_ids of shape [batch, length] "
                             "(inputs_embeds are not supported)")
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ValueError("DlcmForCausalLM: attention_mask with zeros (padding) is not supported; "
                             "a DLCM row is a packed token stream (SPEC 4): pack documents into "
                             "full rows with BOS between them, or run unequal prompts one by one")
        L = input_ids.shape[1]
        if position_ids is not None and not bool(
                (position_ids == torch.arange(L, device=position_ids.device)).all()):
            raise ValueError("DlcmForCausalLM: position_ids must be 0..L-1 (packed rows)")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"DlcmForCausalLM: labels shape {tuple(labels.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")
        P = self._params()
        with _device_scope(input_ids.device):
            if self.training:
                res, loss = self._train_forward(P, input_ids, labels)
            else:
                cfg = self._cfg
                targets = _targets_from_labels(labels) if labels is not None else None
                res = dlcm_forward(P, cfg, input_ids, targets, boundaries, _XATTN)
                loss = res["loss"] if labels is not None else None
        if return_dict is False:
            return (res["logits"],) if loss is None else (loss, res["logits"])
        return CausalLMOutput(loss=loss, logits=res["logits"])

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: every step runs the full causal forward on the whole sequence so far.
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @classmethod
    def dlcm_trainer_class(cls):
        """A transformers.Trainer subclass for DLCM training (imported here, not at module load:
        the Trainer needs accelerate, inference does not). It prepares each optimizer step from
        the micro-batches the Trainer prefetches (step = state.global_step) and adds dlcm_F,
        dlcm_G and dlcm_compression of the last step to the logs."""
        from transformers import Trainer

        class DlcmTrainer(Trainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                if getattr(self.args, "average_tokens_across_devices", False):
                    raise ValueError("DlcmTrainer: set average_tokens_across_devices=False; the "
                                     "DLCM normalises its loss over all ranks itself")

            def _dlcm_model(self):
                return self.accelerator.unwrap_model(self.model)

            def get_batch_samples(self, epoch_iterator, num_batches):
                batches, n_items = super().get_batch_samples(epoch_iterator, num_batches)
                if batches:
                    self._dlcm_model().dlcm_prepare_step(
                        [self._prepare_inputs(dict(b)) for b in batches], step=self.state.global_step)
                return batches, n_items

            def log(self, logs, *args, **kwargs):
                last = self._dlcm_model().dlcm_last
                if "loss" in logs and last:
                    logs = {**logs, "dlcm_F": last["F"], "dlcm_G": last["G"],
                            "dlcm_compression": last["compression"]}
                return super().log(logs, *args, **kwargs)

        return DlcmTrainer
