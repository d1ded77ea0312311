// llama.cpp's greedy decode tokens/s on a GGUF file, through node-llama-cpp's prebuilt CPU build
// (the one tests/interop installs). scripts/bench_decode_llamacpp.sh runs it next to
// `dlcm bench decode`.
// Usage: node bench/llama_decode.mjs MODEL.gguf THREADS PROMPT_LEN NEW_TOKENS
// Prints one JSON line: {"tokens_per_s", "threads", "cpu_per_wall", "prompt_len", "new_tokens",
// "prompt_tokens_per_s"}.
//   tokens_per_s  NEW_TOKENS decode steps (one token in, greedy argmax out) over their wall time,
//                 timed from the first generated token (prompt evaluated) to the last
//   cpu_per_wall  the process's CPU time over wall time during those steps: ~THREADS when
//                 llama.cpp uses the threads asked for and no more
//   prompt_tokens_per_s  PROMPT_LEN over the wall time of a prompt pass into the emptied
//                 sequence after the decode (from the evaluate call to the first generated
//                 token: one batch of the whole prompt, its last position's logits, the first
//                 argmax), the second of two such passes
import {createRequire} from "node:module";
import {fileURLToPath} from "node:url";
import {dirname, join} from "node:path";

// node-llama-cpp is installed under tests/interop (package.json there), not at the repo root.
const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const req = createRequire(join(root, "tests/interop/package.json"));
const {getLlama} = await import(req.resolve("node-llama-cpp"));

const [modelPath, threadsArg, promptArg, newArg] = process.argv.slice(2);
if (!modelPath || !threadsArg || !promptArg || !newArg) {
  console.error("usage: node bench/llama_decode.mjs MODEL.gguf THREADS PROMPT_LEN NEW_TOKENS");
  process.exit(2);
}
const threads = Number(threadsArg), P = Number(promptArg), N = Number(newArg);

// maxThreads caps every context of this process; threads {ideal, min} pins this context to it.
const llama = await getLlama({gpu: false, build: "never", logLevel: "error", maxThreads: threads});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({
  contextSize: P + N + 8, batchSize: Math.max(P, 32), sequences: 1, threads: {ideal: threads, min: threads},
  // f32 K/V cache as dlcm keeps it (llama.cpp's default is f16).
  experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32", flashAttention: false,
});
if (context.currentThreads !== threads) {
  console.error(`llama_decode: context uses ${context.currentThreads} threads, asked for ${threads}`);
  process.exit(1);
}
const seq = context.getSequence();

// A fixed pseudo-random prompt starting with BOS (the content does not change the cost).
const nVocab = Number(model.fileInfo.metadata.llama.vocab_size);
const prompt = [model.tokens.bos];
for (let i = 1; i < P; ++i) prompt.push(4 + ((i * 2654435761) >>> 0) % (nVocab - 4));

let t0 = 0n, c0 = null, got = 0, t1 = 0n, c1 = null;
for await (const _ of seq.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
  // The first token ends the prompt pass; each further one is one decode step.
  if (got === 0) {
    t0 = process.hrtime.bigint();
    c0 = process.cpuUsage();
  }
  if (got === N) {
    t1 = process.hrtime.bigint();
    c1 = process.cpuUsage(c0);
    break;
  }
  ++got;
}
const wall = Number(t1 - t0) / 1e9;
const cpu = (c1.user + c1.system) / 1e6;
// Then the prompt pass on its own, into the emptied sequence: once untimed, once timed (the
// decode above ran first, as it did before this was measured, so its figure is unchanged).
let tp = 0n;
for (let pass = 0; pass < 2; ++pass) {
  await seq.clearHistory();
  tp = process.hrtime.bigint();
  for await (const _ of seq.evaluate(prompt, {temperature: 0, yieldEogToken: true})) break;
}
const prompt_wall = Number(process.hrtime.bigint() - tp) / 1e9;
process.stdout.write(JSON.stringify({
  tokens_per_s: N / wall, threads: context.currentThreads, cpu_per_wall: cpu / wall, prompt_len: P, new_tokens: N,
  prompt_tokens_per_s: P / prompt_wall,
}) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
