"""transformers' side of tests/test_hf_dlcm.cpp (run with the project venv's python): loads a
`dlcm export --format hf` folder of a DLCM with trust_remote_code and compares it with what the
engine wrote into EXPECT (a safetensors file).

  hf_dlcm_check.py infer --model DIR --expect F   logits of `dlcm forward` (<= 1e-4 relative)
                                                  and 32 greedy tokens of the engine's generate
  hf_dlcm_check.py train --model DIR --expect F   one training step with the engine's given
                                                  boundaries: loss and every gradient (<= 1e-4
                                                  relative); the counter-RNG training samples
  hf_dlcm_check.py accum --model DIR [--save D]   2 micro-batches == one batch of both (F, G,
                                                  loss, gradients), 2 gloo ranks == one
                                                  process, also through the HF Trainer;
                                                  the trained model back as a dlcm checkpoint
Exit status 0 when every check passes; each failure prints one line.
"""
import argparse
import sys

import torch


from safetensors.numpy import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

FAILURES = []


def check(ok, what):
    if not ok:
        FAILURES.append(what)
        print("FAIL: " + what, flush=True)


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))


def load(model_dir):
    m = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    check(type(m).__name__ == "DlcmForCausalLM", f"loaded class {type(m).__name__}")
    check(m.dtype == torch.float32, f"dtype {m.dtype}")
    return m


def infer(a):
    e = {k: torch.from_numpy(v) for k, v in load_file(a.expect).items()}
    m = load(a.model).eval()
    tokens = e["tokens"].long()
    with torch.no_grad():
        out = m(tokens, attention_mask=torch.ones_like(tokens))
    err = rel_err(out.logits, e["logits"])
    check(err <= 1e-4, f"logits differ from dlcm forward: {err:.3g} relative")
    prompt = e["prompt"].long()[None]
    want = e["greedy"].long()
    # synced_gpus given: generate() then does not probe FSDP, whose module Debian's torch 1.13
    # cannot import under Python 3.11
    got = m.generate(prompt, max_new_tokens=want.numel(), min_new_tokens=want.numel(),
                     do_sample=False, synced_gpus=False)[0, prompt.shape[1]:]
    check(torch.equal(got, want), f"greedy ids differ from the engine's generate:\n  hf     "
          f"{got.tolist()}\n  engine {want.tolist()}")
    # a padding mask is refused with a message that says why
    try:
        mask = torch.ones_like(tokens)
        mask[0, -1] = 0
        m(tokens, attention_mask=mask)
        check(False, "a padding attention_mask was accepted")
    except ValueError as ex:
        check("padding" in str(ex), f"unclear padding error: {ex}")


def train(a):
    e = {k: torch.from_numpy(v) for k, v in load_file(a.expect).items()}
    m = load(a.model).train()
    tokens = e["tokens"].long()
    labels = e["labels"].long()  # -100 where the engine's target (one position earlier) is -1
    m.dlcm_prepare_step([{"input_ids": tokens, "labels": labels,
                          "boundaries": e["boundaries"].long()}], step=0)
    out = m(tokens, labels=labels)
    out.loss.backward()
    err = abs(float(out.loss) - float(e["loss"])) / abs(float(e["loss"]))
    check(err <= 1e-5, f"loss {float(out.loss):.8g} != engine {float(e['loss']):.8g}")
    check(abs(m.dlcm_last["F"] - float(e["F"])) <= 1e-7, f"F {m.dlcm_last['F']} != {float(e['F'])}")
    n = 0
    for name, p in m.named_parameters():
        g = e["grad." + name]
        err = rel_err(p.grad, g)
        check(err <= 1e-4, f"gradient of {name}: {err:.3g} relative")
        n += 1
    check(n == sum(1 for k in e if k.startswith("grad.")), "parameter count != engine's")

    # training samples: the engine's counter-RNG draws for p = the engine's p
    mod = sys.modules[type(m).__module__.replace("modeling_dlcm", "dlcm_ref_model")]
    cfg = m.config.dlcm_config
    forced = tokens == cfg.bos_id
    forced[:, 0] = True
    b = mod.sample_boundaries(e["p"], forced, cfg.router["alpha"], int(e["seed"][0]),
                              int(e["step"][0]), int(e["row0"][0]))
    want = e["sampled"].bool()
    check(torch.equal(b, want), f"sampled boundaries differ from the engine's in "
          f"{int((b != want).sum())} of {want.numel()} positions")
    check(0 < int(want.sum()) - int(forced.sum()) < int((~forced).sum()),
          "degenerate sample (all or no free boundaries): the check would prove nothing")


def grads(m):
    return {k: p.grad.detach().clone() for k, p in m.named_parameters()}


def one_vs_two(m, tokens, labels, what):
    """One batch of 4 rows against 2 micro-batches of 2 (sampled boundaries, step 7)."""
    m.zero_grad()
    m.dlcm_prepare_step([{"input_ids": tokens, "labels": labels}], step=7)
    big_b = m._prepared["b"][0].clone()
    loss_one = m(tokens, labels=labels).loss
    loss_one.backward()
    one, last_one = grads(m), dict(m.dlcm_last)

    # the same rows as 2 micro-batches of 2: same samples (rows keep their global index)
    m.zero_grad()
    mbs = [{"input_ids": tokens[:2], "labels": labels[:2]},
           {"input_ids": tokens[2:], "labels": labels[2:]}]
    m.dlcm_prepare_step(mbs, step=7)
    check(torch.equal(torch.cat(m._prepared["b"]), big_b),
          f"{what}: micro-batch samples != one batch's")
    total = 0.0
    for mb in mbs:
        loss = m(mb["input_ids"], labels=mb["labels"]).loss
        loss.backward()
        total += float(loss)
    two, last_two = grads(m), dict(m.dlcm_last)
    check(abs(total - float(loss_one)) <= 1e-6 * abs(float(loss_one)),
          f"{what}: summed micro-batch losses {total:.8g} != one batch {float(loss_one):.8g}")
    for k in ("F", "G", "ce", "aux", "loss"):
        check(abs(last_one[k] - last_two[k]) <= 1e-6 * max(1.0, abs(last_one[k])),
              f"{what}: step {k}: one batch {last_one[k]:.8g}, two micro-batches {last_two[k]:.8g}")
    for k in one:
        err = rel_err(two[k], one[k])
        check(err <= 1e-5, f"{what}: accumulated gradient of {k}: {err:.3g} relative to one batch")
    check(0 < last_one["F"] < 1, "degenerate boundaries (F = 0 or 1)")


def _rank_main(rank, model_dir, tokens, labels, init_file, out_file):
    """One of 2 gloo ranks (a spawned process): rows 2*rank, 2*rank+1; gradients averaged over
    the ranks as DDP does; rank 0 saves loss, step stats and gradients."""
    torch.set_num_threads(1)
    m = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).train()
    torch.distributed.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                                         world_size=2)
    rows = slice(2 * rank, 2 * rank + 2)
    m.zero_grad()
    m.dlcm_prepare_step([{"input_ids": tokens[rows], "labels": labels[rows]}], step=7)
    b = m._prepared["b"][0].to(torch.uint8)  # gloo gathers no bool tensors
    loss = m(tokens[rows], labels=labels[rows]).loss
    loss.backward()
    for p in m.parameters():
        torch.distributed.all_reduce(p.grad)
        p.grad /= 2
    losses = [torch.zeros(()) for _ in range(2)]
    torch.distributed.all_gather(losses, loss.detach())
    bs = [torch.zeros_like(b) for _ in range(2)]
    torch.distributed.all_gather(bs, b)
    if rank == 0:
        torch.save({"loss": sum(losses) / 2, "last": m.dlcm_last, "b": torch.cat(bs),
                    "grads": grads(m)}, out_file)
    torch.distributed.destroy_process_group()


def two_ranks(m, model_dir, tokens, labels):
    import multiprocessing
    import os
    import tempfile

    m.zero_grad()
    m.dlcm_prepare_step([{"input_ids": tokens, "labels": labels}], step=7)
    big_b = m._prepared["b"][0].clone()
    loss_one = m(tokens, labels=labels).loss
    loss_one.backward()
    one, last_one = grads(m), dict(m.dlcm_last)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        # spawn, not fork: a forked child can hang in the OpenMP pool the parent has used
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(r, model_dir, tokens, labels, init_file, out_file))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        codes = [p.exitcode for p in procs]
        for p in procs:
            if p.is_alive():
                p.terminate()
        check(codes == [0, 0], f"2 ranks: exit codes {codes} (None = still running after 120 s)")
        if not os.path.exists(out_file):
            return
        got = torch.load(out_file)
    check(torch.equal(got["b"].bool(), big_b), "2 ranks: samples != one process's (global rows)")
    # DDP averages: the mean of the ranks' returned losses is the global step loss
    check(abs(float(got["loss"]) - float(loss_one)) <= 1e-6 * abs(float(loss_one)),
          f"2 ranks: loss {float(got['loss']):.8g} != one process {float(loss_one):.8g}")
    for k in ("F", "G", "ce", "aux", "loss"):
        check(abs(got["last"][k] - last_one[k]) <= 1e-6 * max(1.0, abs(last_one[k])),
              f"2 ranks: step {k} {got['last'][k]:.8g} != one process {last_one[k]:.8g}")
    for k in one:
        err = rel_err(got["grads"][k], one[k])
        check(err <= 1e-5, f"2 ranks: averaged gradient of {k}: {err:.3g} relative to one process")


def accum(a):
    m = load(a.model).train()
    V = m.config.vocab_size
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, V, (4, 20), generator=g)
    tokens[:, 0] = m.config.bos_token_id
    tokens[1, 9] = m.config.bos_token_id
    labels = tokens.clone()
    labels[2, 5:8] = -100

    for aux_kind in ("global", "sequence"):  # the Global Parser, and its per-row variant
        m.config.dlcm["aux_kind"] = aux_kind
        one_vs_two(m, tokens, labels, aux_kind)
    m.config.dlcm["aux_kind"] = "global"
    mbs = [{"input_ids": tokens[:2], "labels": labels[:2]},
           {"input_ids": tokens[2:], "labels": labels[2:]}]
    # a forward that is not the prepared micro-batch is refused
    m.dlcm_prepare_step(mbs, step=8)
    try:
        m(tokens[2:], labels=labels[2:])
        check(False, "a micro-batch out of order was accepted")
    except ValueError as ex:
        check("dlcm_prepare_step" in str(ex), f"unclear order error: {ex}")

    # 2 torch.distributed ranks (gloo) of 2 rows each == one process with all 4 rows
    two_ranks(m, a.model, tokens, labels)

    # The HF Trainer: gradient_accumulation_steps 2 x batch 2 == 1 x batch 4 (one SGD step)
    trained = trainer_check(a, tokens, labels)
    if a.save:  # back to the engine: a dlcm checkpoint and the trained model's logits
        import os

        from safetensors.torch import save_file

        trained.dlcm_save_checkpoint(os.path.join(a.save, "ckpt"))
        trained.eval()
        with torch.no_grad():
            logits = trained(tokens).logits
        save_file({"logits": logits.contiguous()}, os.path.join(a.save, "hf_logits.safetensors"))
        with open(os.path.join(a.save, "tokens.txt"), "w") as f:
            for row in tokens.tolist():
                f.write(" ".join(str(v) for v in row) + "\n")


def trainer_check(a, tokens, labels):
    import tempfile

    from transformers import TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return tokens.shape[0]

        def __getitem__(self, i):
            return {"input_ids": tokens[i], "labels": labels[i]}

    delta = []
    for bs, acc in ((4, 1), (2, 2)):
        m = load(a.model)
        before = {k: p.detach().clone() for k, p in m.named_parameters()}
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=bs,
                                     gradient_accumulation_steps=acc, max_steps=1, learning_rate=0.5,
                                     optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                                     max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no",
                                     use_cpu=True, dataloader_drop_last=False, seed=3, disable_tqdm=True)
            trainer = m.dlcm_trainer_class()(model=m, args=args, train_dataset=Rows())
            trainer._get_train_sampler = lambda: torch.utils.data.SequentialSampler(Rows())
            trainer.train()
            logs = [h for h in trainer.state.log_history if "dlcm_F" in h]
            check(len(logs) == 1, f"Trainer logs without dlcm_F: {trainer.state.log_history}")
        delta.append({k: p.detach() - before[k] for k, p in m.named_parameters()})
        moved = sum(1 for v in delta[-1].values() if float(v.abs().max()) > 0)
        check(moved == len(delta[-1]), f"Trainer step moved {moved} of {len(delta[-1])} tensors")
    for k in delta[0]:
        err = rel_err(delta[1][k], delta[0][k])
        check(err <= 1e-4, f"Trainer: the update of {k} differs between 2x2 and 1x4 micro-batches "
              f"({err:.3g} relative)")
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["infer", "train", "accum"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--expect")
    ap.add_argument("--save", help="accum: write the Trainer-trained model as a dlcm checkpoint "
                    "(SAVE/ckpt), its logits (SAVE/hf_logits.safetensors) and rows (SAVE/tokens.txt)")
    a = ap.parse_args()
    torch.manual_seed(0)
    {"infer": infer, "train": train, "accum": accum}[a.mode](a)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed", flush=True)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
