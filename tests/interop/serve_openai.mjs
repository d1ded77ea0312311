// `dlcm serve` through the official openai npm SDK (pinned in package.json); driven by
// serve_openai_check.py --client node, which trains the model, starts the server and computes the
// references. Usage: node serve_openai.mjs SPEC.json
//   SPEC {"base": "http://127.0.0.1:PORT/v1", "model": ID, "max_new": N,
//         "cases": [{"prompt", "ids" (no BOS), "text", "finish", "completion_tokens",
//                    "echo": [log-softmax of dlcm forward at each prompt token after BOS]}],
//         "chat": {"messages", "text", "finish"}}
// Prints ok/FAIL lines; exits 1 when a check fails.
import {readFileSync} from "node:fs";
import OpenAI from "openai";

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const client = new OpenAI({baseURL: spec.base, apiKey: "unused", maxRetries: 0, timeout: 120000});
const fails = [];
function check(ok, what) {
  console.log((ok ? "ok   " : "FAIL ") + "node: " + what);
  if (!ok) fails.push(what);
}
const q = (s) => JSON.stringify(s);
// A logprobs token's bytes: "bytes:\xNN..." marks a piece that is not whole UTF-8.
const pieceBytes = (p) => p.startsWith("bytes:")
  ? Buffer.from(p.slice(6).split("\\x").slice(1).map((h) => parseInt(h, 16)))
  : Buffer.from(p, "utf8");

const models = await client.models.list();
check(models.data.length === 1 && models.data[0].id === spec.model,
      `models.list: one model ${q(spec.model)} (got ${q(models.data.map((m) => m.id))})`);

for (const c of spec.cases) {
  const r = await client.completions.create({model: spec.model, prompt: c.prompt,
                                             max_tokens: spec.max_new, temperature: 0});
  const ch = r.choices[0];
  check(ch.text === c.text && ch.finish_reason === c.finish &&
        r.usage.completion_tokens === c.completion_tokens,
        `completion of a ${c.ids.length}-token prompt == dlcm generate's ${q(c.text)} (${c.finish})` +
        (ch.text === c.text ? "" : `, got ${q(ch.text)}`));
  const ri = await client.completions.create({model: spec.model, prompt: c.ids,
                                              max_tokens: spec.max_new, temperature: 0});
  check(ri.choices[0].text === c.text, "the same prompt as token ids: the same text");

  const e = await client.completions.create({model: spec.model, prompt: c.prompt, max_tokens: 0,
                                             echo: true, logprobs: 1, temperature: 0});
  const got = e.choices[0].logprobs.token_logprobs;
  let err = got.length === c.echo.length ? 0 : Infinity;
  for (let i = 0; i < got.length && err !== Infinity; i++)
    err = got[i] === null ? Infinity : Math.max(err, Math.abs(got[i] - c.echo[i]));
  check(e.choices[0].text === c.prompt && err <= 1e-4,
        `echo of ${c.echo.length} prompt tokens: logprobs vs dlcm forward, max |diff| ${err.toExponential(2)} <= 1e-4`);
}

const many = await client.completions.create({model: spec.model, prompt: spec.cases.map((c) => c.prompt),
                                              max_tokens: spec.max_new, temperature: 0});
const byIndex = [...many.choices].sort((a, b) => a.index - b.index);
check(byIndex.length === spec.cases.length && byIndex.every((ch, i) => ch.text === spec.cases[i].text),
      `a list of ${spec.cases.length} prompts in one request: each equals its greedy text`);

for (const c of spec.cases.slice(0, 2)) {
  const stream = await client.completions.create({model: spec.model, prompt: c.prompt, max_tokens: spec.max_new,
                                                  temperature: 0, stream: true,
                                                  stream_options: {include_usage: true}});
  let text = "", finishes = [], usage = null, n = 0;
  for await (const chunk of stream) {
    n++;
    if (chunk.usage) usage = chunk.usage;
    for (const ch of chunk.choices) {
      text += ch.text ?? "";
      if (ch.finish_reason) finishes.push(ch.finish_reason);
    }
  }
  check(text === c.text && finishes.length === 1 && finishes[0] === c.finish && usage &&
        usage.completion_tokens === c.completion_tokens,
        `streamed completion: ${n} chunks add up to generate's text, finish ${q(finishes)}, usage chunk`);
}

const lp = await client.completions.create({model: spec.model, prompt: spec.cases[0].prompt, max_tokens: 8,
                                            temperature: 0, logprobs: 2});
const l = lp.choices[0].logprobs;
check(l.tokens.length === lp.usage.completion_tokens && Buffer.concat(l.tokens.map(pieceBytes)).toString("utf8") === lp.choices[0].text &&
      l.top_logprobs.every((t, i) => Object.keys(t).length === 2 && Math.max(...Object.values(t)) === l.token_logprobs[i]),
      `logprobs=2: ${l.tokens.length} tokens spell the text, each the best of its alternatives`);

const chat = await client.chat.completions.create({model: spec.model, messages: spec.chat.messages,
                                                   max_tokens: spec.max_new, temperature: 0});
const m = chat.choices[0];
check(m.message.role === "assistant" && m.message.content === spec.chat.text && m.finish_reason === spec.chat.finish,
      `chat completion == dlcm generate of the rendered template: ${q(spec.chat.text)}` +
      (m.message.content === spec.chat.text ? "" : `, got ${q(m.message.content)}`));
const cs = await client.chat.completions.create({model: spec.model, messages: spec.chat.messages,
                                                 max_tokens: spec.max_new, temperature: 0, stream: true});
let role = null, content = "", cfin = [];
for await (const chunk of cs) {
  for (const ch of chunk.choices) {
    if (ch.delta.role && role === null) role = ch.delta.role;
    content += ch.delta.content ?? "";
    if (ch.finish_reason) cfin.push(ch.finish_reason);
  }
}
check(role === "assistant" && content === m.message.content && cfin.length === 1,
      `streamed chat: role first, deltas add up to the answer, finish ${q(cfin)}`);
const cl = await client.chat.completions.create({model: spec.model, messages: spec.chat.messages, max_tokens: 6,
                                                 temperature: 0, logprobs: true, top_logprobs: 2});
const items = cl.choices[0].logprobs?.content ?? [];
check(items.length === cl.usage.completion_tokens && Buffer.concat(items.map((t) => Buffer.from(t.bytes))).toString("utf8") === cl.choices[0].message.content &&
      items.every((t) => t.top_logprobs.length === 2 && t.top_logprobs[0].logprob === t.logprob),
      `chat logprobs: ${items.length} tokens with 2 alternatives, the first the chosen`);

if (fails.length) {
  console.error(`${fails.length} node check(s) failed`);
  process.exit(1);
}
console.log("node: all openai npm SDK checks passed");
