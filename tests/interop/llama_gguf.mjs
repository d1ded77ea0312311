// llama.cpp's view of GGUF files, through node-llama-cpp's prebuilt CPU build; tests/test_gguf.cpp
// compares it with dlcm. Usage: node llama_gguf.mjs REQUEST.json > RESULT.json
//   REQUEST {"jobs": [{"model": "file.gguf", "tasks": [TASK...]}...]}
//   RESULT  {"jobs": [[one result per task]...]}
// TASK:
//   {"kind": "metadata"}                         -> {"metadata": {...}, "tensors": [{name, dims, type}]}
//       (node-llama-cpp's own GGUF parser; dims innermost first)
//   {"kind": "logprobs", "tokens": [ids]}        -> {"logprobs": [[V values] per position]}
//       log-softmax of llama.cpp's logits after each prefix: node-llama-cpp returns the
//       probabilities of the greedy sampler's candidates (every token), i.e. the softmax of the
//       raw logits, not the logits themselves
//   {"kind": "greedy", "tokens": [ids], "n": N}  -> {"ids": [N ids]} (argmax, EOS not special)
//   {"kind": "tokenize", "text": "..."}          -> {"ids": [...]} (no BOS; "<s>" is plain text)
//   {"kind": "detokenize", "ids": [...]}         -> {"text": "..."} (specials skipped)
// Exits non-zero with the error on stderr when llama.cpp refuses a file.
import {readFileSync} from "node:fs";
import {getLlama, readGgufFileInfo} from "node-llama-cpp";

const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});

async function withSequence(model, fn) {
  const context = await model.createContext({
    contextSize: 256, batchSize: 256, sequences: 1, threads: 1,
    // llama.cpp keeps K and V in f16 by default; f32 makes the f32 file an exact comparison.
    experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32", flashAttention: false,
  });
  try {
    return await fn(context.getSequence());
  } finally {
    await context.dispose();
  }
}

async function runTask(model, info, task) {
  const nVocab = Number(info.metadata.llama.vocab_size);
  switch (task.kind) {
    case "metadata":
      return {
        metadata: info.metadata,
        tensors: info.fullTensorInfo.map((t) => ({name: t.name, dims: t.dimensions.map(Number), type: t.ggmlType})),
      };
    case "logprobs":
      return {
        logprobs: await withSequence(model, async (seq) => {
          const items = task.tokens.map((t) => [t, {generateNext: {probabilities: true, options: {temperature: 0}}}]);
          const out = await seq.controlledEvaluate(items);
          return out.map((r) => {
            const row = new Array(nVocab).fill(null);
            for (const [id, p] of r.next.probabilities) row[id] = Math.log(p);
            return row;
          });
        }),
      };
    case "greedy":
      return {
        ids: await withSequence(model, async (seq) => {
          const got = [];
          for await (const t of seq.evaluate(task.tokens, {temperature: 0, yieldEogToken: true})) {
            got.push(t);
            if (got.length >= task.n) break;
          }
          return got;
        }),
      };
    case "tokenize":
      return {ids: Array.from(model.tokenize(task.text, false))};
    case "detokenize":
      return {text: model.detokenize(task.ids, false)};
  }
  throw new Error(`unknown task kind ${task.kind}`);
}

const req = JSON.parse(readFileSync(process.argv[2], "utf8"));
const jobs = [];
for (const job of req.jobs) {
  const model = await llama.loadModel({modelPath: job.model});
  const info = await readGgufFileInfo(job.model, {readTensorInfo: true});
  const results = [];
  for (const task of job.tasks) results.push(await runTask(model, info, task));
  jobs.push(results);
  await model.dispose();
}
// GGUF u64 values come back as BigInt.
process.stdout.write(JSON.stringify({jobs}, (k, v) => (typeof v === "bigint" ? Number(v) : v)));
await llama.dispose();
