// OpenAI API conformance of kvr_gateway, driven by the official OpenAI Node
// SDK (npm `openai` v4, pinned by package-lock.json) — issue 19.
//
// Starts one kvr_worker (stories260K, in-process retrieval node) and one
// kvr_gateway on 127.0.0.1 with ports chosen at run time (read back from
// their "... on HOST:PORT" lines), with an API-keys file holding an
// unlimited key and a key limited to one request in flight. Then drives
// models.list, completions and chat (plain and streamed with
// include_usage), logprobs (completions and chat), echo with max_tokens 0,
// n, presence / frequency penalties, stop, seed, user, prompt batches and
// token-id prompts, and the error shapes the SDK parses (400 naming the
// parameter, 404 for an unknown model, 429). Values are asserted: greedy
// text equals `kvr generate` (the embedded engine), logprobs equal the
// gateway's gRPC API (kvr.v1.Generation) to 1e-5, n greedy copies are
// identical, a seed reproduces its choices.
//
// Usage: node conformance.mjs --gateway PATH --worker PATH --kvr PATH
//        --models DIR --proto DIR
// Exit status 0 when every check passed; every process started is stopped
// (SIGTERM, then SIGKILL after 10 s) on every path out, and the whole run
// is bounded by a 240 s watchdog.
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

import OpenAI from 'openai';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const args = {};
for (let i = 2; i + 1 < process.argv.length; i += 2) {
  args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
}
const suite = args.suite ?? 'sdk';  // sdk: the SDK checks; eval: `kvr eval` vs its oracle
if (suite === 'eval' && !args.tasks) {
  console.error('missing --tasks');
  process.exit(2);
}
for (const name of ['gateway', 'worker', 'kvr', 'models', 'proto']) {
  if (!args[name]) {
    console.error(`missing --${name}`);
    process.exit(2);
  }
}
const model = path.join(args.models, 'stories260K.bin');
const tokenizer = path.join(args.models, 'tok512.bin');

// ---------------------------------------------------------------------------
// Processes.

const children = [];

// Starts argv[0] with the rest; resolves with {proc, addrs} once every name
// in `wants` appeared as "<program> <name> on 127.0.0.1:PORT" (e.g.
// "listening", "http"), rejects when the output ends or 60 s pass first.
function startServer(argv, wants) {
  const proc = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(proc);
  const addrs = {};
  const lines = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${argv[0]} did not start:\n${lines.join('\n')}`)),
                             60000);
    const onLine = (line) => {
      lines.push(line);
      const m = /^\S+ (\w+) on (127\.0\.0\.1:\d+)/.exec(line);
      if (m && !(m[1] in addrs)) addrs[m[1]] = m[2];
      if (wants.every((w) => w in addrs)) {
        clearTimeout(timer);
        resolve({ proc, addrs });
      }
    };
    readline.createInterface({ input: proc.stdout }).on('line', onLine);
    readline.createInterface({ input: proc.stderr }).on('line', (l) => lines.push(l));
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${argv[0]} exited (${code}) before it was ready:\n${lines.join('\n')}`));
    });
  });
}

// SIGTERM every child, SIGKILL one still running after 10 s.
async function stopAll() {
  await Promise.all(children.map((c) => new Promise((resolve) => {
    if (c.exitCode !== null || c.signalCode !== null) return resolve();
    const kill = setTimeout(() => c.kill('SIGKILL'), 10000);
    c.once('exit', () => { clearTimeout(kill); resolve(); });
    c.kill('SIGTERM');
  })));
}

const watchdog = setTimeout(async () => {
  console.error('FAIL: the conformance run took longer than 240 s');
  await stopAll();
  process.exit(1);
}, 240000);

// ---------------------------------------------------------------------------
// Checks.

let passed = 0;
const failures = [];
async function check(name, fn) {
  try {
    await fn();
    passed += 1;
    console.log(`ok   ${name}`);
  } catch (e) {
    failures.push(name);
    console.log(`FAIL ${name}\n${e.stack || e}`);
  }
}

// The SDK error a call throws (fails when it succeeds).
async function sdkError(promise) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  throw new Error('expected the call to fail');
}

function near(a, b, tol, what) {
  assert.ok(Math.abs(a - b) <= tol, `${what}: ${a} vs ${b} (tolerance ${tol})`);
}

async function main() {
  const dir = mkdtempSync(path.join(tmpdir(), 'kvr-openai-sdk-'));
  try {
    // Two keys: one unlimited, one with a single request in flight.
    const [key, entry] = execFileSync(args.kvr, ['apikey', '--id', 'conformance'])
      .toString().trim().split('\n');
    const [oneKey, oneEntry] = execFileSync(args.kvr, ['apikey', '--id', 'one-at-a-time',
                                                       '--max_concurrent', '1'])
      .toString().trim().split('\n');
    const keysFile = path.join(dir, 'keys.json');
    writeFileSync(keysFile, JSON.stringify({
      keys: [JSON.parse(entry), JSON.parse(oneEntry)],
    }));

    const worker = await startServer(
      [args.worker, '--listen=127.0.0.1:0', '--metrics_listen=127.0.0.1:0', `--model=${model}`,
       `--tokenizer=${tokenizer}`, '--max_concurrent=4', '--max_queue=64'],
      ['listening']);
    const gateway = await startServer(
      [args.gateway, '--listen=127.0.0.1:0', '--http_listen=127.0.0.1:0',
       '--metrics_listen=127.0.0.1:0', `--workers=${worker.addrs.listening}`,
       `--api_keys_file=${keysFile}`],
      ['listening', 'http']);

    const client = new OpenAI({ apiKey: key, baseURL: `http://${gateway.addrs.http}/v1`,
                                maxRetries: 0, timeout: 60000 });

    // The gateway's gRPC API, the logprobs oracle.
    const def = protoLoader.loadSync('kvr/v1/generation.proto',
                                     { keepCase: true, longs: Number, defaults: true,
                                       oneofs: true, includeDirs: [path.resolve(args.proto)] });
    const { Generation } = grpc.loadPackageDefinition(def).kvr.v1;
    const stub = new Generation(gateway.addrs.listening, grpc.credentials.createInsecure());
    const md = new grpc.Metadata();
    md.set('authorization', `Bearer ${key}`);
    const deadline = () => ({ deadline: Date.now() + 60000 });
    const generate = (request) => new Promise((resolve, reject) => {
      const out = { text: '', token_ids: [], logprobs: [], summary: null };
      const call = stub.Generate(request, md, deadline());
      call.on('data', (m) => {
        if (m.chunk) {
          out.text += m.chunk.text;
          out.token_ids.push(...m.chunk.token_ids);
          out.logprobs.push(...m.chunk.logprobs);
        }
        if (m.summary) out.summary = m.summary;
      });
      call.on('error', reject);
      call.on('end', () => resolve(out));
    });
    const tokenize = (text) => new Promise((resolve, reject) => {
      stub.Tokenize({ text, add_bos: true }, md, deadline(),
                    (err, r) => (err ? reject(err) : resolve(r.ids)));
    });

    // `kvr generate` (embedded engine, same defaults): prompt + text + "\n".
    const embedded = (prompt, maxTokens) => {
      const out = execFileSync(args.kvr, ['generate', `--model=${model}`,
                                          `--tokenizer=${tokenizer}`, '--prompt', prompt,
                                          '--max_tokens', String(maxTokens)],
                               { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
      assert.ok(out.startsWith(prompt) && out.endsWith('\n'), `kvr generate printed ${out}`);
      return out.slice(prompt.length, -1);
    };

    const P = 'Once upon a time, there was a little girl named Lily. She';
    const greedy = { model: 'stories260K', temperature: 0 };
    let plain;  // the greedy completion of P, 32 tokens

    if (suite === 'eval') {
      await check('kvr eval prints the accuracy its gRPC oracle gives', async () => {
        const out = execFileSync(args.kvr, ['eval', '--url', `http://${gateway.addrs.http}`,
                                            '--api_key', key, '--tasks', args.tasks],
                                 { stdio: ['ignore', 'pipe', 'inherit'] }).toString();
        console.log(out.trimEnd());
        const printed = {};
        for (const line of out.trim().split('\n').slice(1)) {
          const [task, mode, correct, total, accuracy] = line.trim().split(/\s+/);
          printed[`${task}/${mode}`] = { correct: Number(correct), total: Number(total),
                                         accuracy: Number(accuracy) };
        }
        const items = readFileSync(args.tasks, 'utf8').split('\n').filter((l) => l.trim())
          .map((l) => JSON.parse(l));
        // The oracle: the gRPC API's prompt logprobs (BOS dropped, byte
        // offsets from the token pieces) and its greedy text.
        const score = async (context, choice, mode) => {
          const g = await generate({ text: context + choice, max_tokens: 0, logprobs: 0,
                                     echo: true, sampling: { temperature: 0 },
                                     attention: { mode } });
          let offset = 0;
          let sum = 0;
          for (const t of g.summary.prompt_logprobs.slice(1)) {
            if (offset >= Buffer.byteLength(context)) sum += t.logprob;
            offset += t.text.length;
          }
          return sum;
        };
        let checked = 0;
        for (const mode of ['full', 'retrieval']) {
          let mc = 0;
          let mcTotal = 0;
          let pk = 0;
          let pkTotal = 0;
          for (const item of items) {
            if (item.type === 'choice') {
              const sums = [];
              for (const c of item.choices) sums.push(await score(item.context, c, mode));
              let best = 0;
              sums.forEach((v, i) => { if (v > sums[best]) best = i; });
              mc += best === item.answer ? 1 : 0;
              mcTotal += 1;
            } else {
              const g = await generate({ text: item.context, max_tokens: 8,
                                         sampling: { temperature: 0 }, attention: { mode } });
              pk += g.text.replace(/^ +/, '').startsWith(item.answer) ? 1 : 0;
              pkTotal += 1;
            }
          }
          assert.deepEqual(printed[`choice/${mode}`], { correct: mc, total: mcTotal,
                                                        accuracy: Number((mc / mcTotal).toFixed(4)) });
          assert.deepEqual(printed[`passkey/${mode}`], { correct: pk, total: pkTotal,
                                                         accuracy: Number((pk / pkTotal).toFixed(4)) });
          checked += 2;
        }
        assert.equal(checked, 4);
        // A bad tasks file is refused naming the line and the limit.
        const bad = path.join(dir, 'bad.jsonl');
        writeFileSync(bad, '{"type": "choice", "context": "x", "choices": ["a"], "answer": 0}\n');
        let failed = null;
        try {
          execFileSync(args.kvr, ['eval', '--url', `http://${gateway.addrs.http}`, '--api_key',
                                  key, '--tasks', bad], { stdio: ['ignore', 'pipe', 'pipe'] });
        } catch (e) {
          failed = e;
        }
        assert.ok(failed, 'kvr eval accepted a one-choice item');
        assert.equal(failed.status, 2);
        assert.match(failed.stderr.toString(), /tasks line 1: "choices" must be an array of 2 to 16/);
      });
    } else {
      await check('models.list names the served model', async () => {
        const ids = [];
        for await (const m of client.models.list()) ids.push(m.id);
        assert.deepEqual(ids, ['stories260K']);
      });

      await check('completions: greedy text equals the embedded engine', async () => {
        plain = await client.completions.create({ ...greedy, prompt: P, max_tokens: 32 });
        assert.equal(plain.object, 'text_completion');
        assert.equal(plain.choices.length, 1);
        assert.equal(plain.choices[0].text, embedded(P, 32));
        assert.equal(plain.choices[0].finish_reason, 'length');
        assert.equal(plain.choices[0].logprobs, null);
        assert.equal(plain.usage.completion_tokens, 32);
        assert.equal(plain.usage.total_tokens, plain.usage.prompt_tokens + 32);
      });

      await check('completions: streamed with include_usage equals the whole response', async () => {
        const stream = await client.completions.create({
          ...greedy, prompt: P, max_tokens: 32, stream: true,
          stream_options: { include_usage: true } });
        let text = '';
        let usage = null;
        let finish = null;
        for await (const c of stream) {
          if (c.usage) usage = c.usage;
          for (const ch of c.choices) {
            text += ch.text;
            if (ch.finish_reason) finish = ch.finish_reason;
          }
        }
        assert.equal(text, plain.choices[0].text);
        assert.equal(finish, 'length');
        assert.deepEqual(usage, plain.usage);
      });

      await check('chat: greedy reply equals the completion of its rendered prompt', async () => {
        const chat = await client.chat.completions.create({
          ...greedy, max_tokens: 24, messages: [{ role: 'user', content: 'Tell me a story.' }] });
        const ref = await client.completions.create({
          ...greedy, max_tokens: 24, prompt: 'User: Tell me a story.\nAssistant:',
          stop: ['\nUser:'] });
        assert.equal(chat.object, 'chat.completion');
        assert.equal(chat.choices[0].message.role, 'assistant');
        assert.equal(chat.choices[0].message.content, ref.choices[0].text);
        assert.ok(ref.choices[0].text.length > 0);
        const stream = await client.chat.completions.create({
          ...greedy, max_tokens: 24, messages: [{ role: 'user', content: 'Tell me a story.' }],
          stream: true, stream_options: { include_usage: true } });
        let text = '';
        let usage = null;
        for await (const c of stream) {
          if (c.usage) usage = c.usage;
          for (const ch of c.choices) text += ch.delta.content ?? '';
        }
        assert.equal(text, chat.choices[0].message.content);
        assert.deepEqual(usage, chat.usage);
      });

      await check('completions logprobs: shape, greedy = top-1, equal to gRPC to 1e-5', async () => {
        const r = await client.completions.create({ ...greedy, prompt: P, max_tokens: 16,
                                                    logprobs: 3 });
        const lp = r.choices[0].logprobs;
        assert.equal(lp.tokens.length, 16);
        assert.equal(lp.tokens.join(''), r.choices[0].text);
        let offset = 0;
        for (let i = 0; i < 16; i++) {
          assert.equal(lp.text_offset[i], offset);
          offset += Buffer.byteLength(lp.tokens[i]);
          const top = Object.entries(lp.top_logprobs[i]).sort((a, b) => b[1] - a[1]);
          assert.ok(top.length >= 1 && top.length <= 3);
          assert.equal(top[0][0], lp.tokens[i]);
          assert.equal(top[0][1], lp.token_logprobs[i]);
        }
        const g = await generate({ text: P, max_tokens: 16, sampling: { temperature: 0 },
                                   logprobs: 3 });
        assert.equal(g.text, r.choices[0].text);
        assert.equal(g.logprobs.length, 16);
        for (let i = 0; i < 16; i++) {
          near(lp.token_logprobs[i], g.logprobs[i].logprob, 1e-5, `token ${i}`);
          assert.equal(g.logprobs[i].top.length, 3);
          assert.equal(g.logprobs[i].top[0].token_id, g.token_ids[i]);
        }
      });

      await check('echo + max_tokens 0 + logprobs: the prompt scored, equal to gRPC', async () => {
        const r = await client.completions.create({ ...greedy, prompt: P, max_tokens: 0,
                                                    echo: true, logprobs: 1 });
        const c = r.choices[0];
        assert.equal(c.text, P);
        assert.equal(c.logprobs.tokens.join(''), P);
        assert.equal(r.usage.completion_tokens, 0);
        const g = await generate({ text: P, max_tokens: 0, sampling: { temperature: 0 },
                                   logprobs: 1, echo: true });
        const prompt = g.summary.prompt_logprobs;
        assert.equal(prompt.length, r.usage.prompt_tokens);    // BOS included there
        assert.ok(prompt[0].logprob == null);                  // nothing predicts BOS
        assert.equal(c.logprobs.token_logprobs.length, prompt.length - 1);  // BOS not echoed
        for (let i = 0; i < c.logprobs.token_logprobs.length; i++) {
          assert.equal(typeof c.logprobs.token_logprobs[i], 'number');
          assert.ok(c.logprobs.token_logprobs[i] <= 0);
          near(c.logprobs.token_logprobs[i], prompt[i + 1].logprob, 1e-5, `prompt token ${i}`);
        }
        // Echo with generation: prompt, then the greedy text, scored throughout.
        const both = await client.completions.create({ ...greedy, prompt: P, max_tokens: 8,
                                                       echo: true, logprobs: 0 });
        assert.equal(both.choices[0].text, P + embedded(P, 8));
        assert.equal(both.choices[0].logprobs.tokens.length, prompt.length - 1 + 8);
      });

      await check('chat logprobs + top_logprobs', async () => {
        const r = await client.chat.completions.create({
          ...greedy, max_tokens: 12, logprobs: true, top_logprobs: 2,
          messages: [{ role: 'user', content: 'Hi' }] });
        const content = r.choices[0].logprobs.content;
        assert.ok(content.length > 0);
        assert.equal(content.map((t) => t.token).join(''), r.choices[0].message.content);
        for (const t of content) {
          assert.equal(t.top_logprobs.length, 2);
          assert.equal(t.top_logprobs[0].token, t.token);
          assert.equal(t.top_logprobs[0].logprob, t.logprob);
          assert.ok(t.top_logprobs[1].logprob <= t.logprob);
          assert.deepEqual(t.bytes, [...Buffer.from(t.token)]);
        }
        const stream = await client.chat.completions.create({
          ...greedy, max_tokens: 12, logprobs: true, top_logprobs: 2, stream: true,
          messages: [{ role: 'user', content: 'Hi' }] });
        const streamed = [];
        for await (const c of stream) {
          for (const ch of c.choices) streamed.push(...(ch.logprobs?.content ?? []));
        }
        assert.deepEqual(streamed, content);
      });

      await check('n: greedy copies identical, sampled ones differ and a seed reproduces them',
                  async () => {
        const r = await client.completions.create({ ...greedy, prompt: P, max_tokens: 32, n: 3 });
        assert.deepEqual(r.choices.map((c) => c.index), [0, 1, 2]);
        for (const c of r.choices) assert.equal(c.text, plain.choices[0].text);
        assert.equal(r.usage.completion_tokens, 96);
        assert.equal(r.usage.prompt_tokens, plain.usage.prompt_tokens);
        const req = { model: 'stories260K', prompt: 'Lily', max_tokens: 16, n: 4,
                      temperature: 1.5, seed: 7 };
        const a = await client.completions.create(req);
        const b = await client.completions.create(req);
        assert.deepEqual(a.choices.map((c) => c.text), b.choices.map((c) => c.text));
        assert.ok(new Set(a.choices.map((c) => c.text)).size > 1, 'all sampled choices equal');
        const s = await client.chat.completions.create({
          ...greedy, n: 2, max_tokens: 8, stream: true,
          messages: [{ role: 'user', content: 'Hi' }] });
        const texts = ['', ''];
        for await (const c of s) for (const ch of c.choices) texts[ch.index] += ch.delta.content ?? '';
        assert.equal(texts[0], texts[1]);
        assert.ok(texts[0].length > 0);
      });

      await check('seed: same seed same text, another seed another text', async () => {
        const req = { model: 'stories260K', prompt: P, max_tokens: 24, temperature: 1.0 };
        const a = await client.completions.create({ ...req, seed: 42 });
        const b = await client.completions.create({ ...req, seed: 42 });
        const c = await client.completions.create({ ...req, seed: 43 });
        assert.equal(a.choices[0].text, b.choices[0].text);
        assert.notEqual(a.choices[0].text, c.choices[0].text);
      });

      await check('presence / frequency penalties: fewer repeats, equal to gRPC', async () => {
        const base = { ...greedy, prompt: 'Lily', max_tokens: 48, logprobs: 0 };
        const r0 = await client.completions.create(base);
        const r1 = await client.completions.create({ ...base, presence_penalty: 1.5,
                                                     frequency_penalty: 1.0 });
        const repeats = (r) => r.choices[0].logprobs.tokens.length -
                               new Set(r.choices[0].logprobs.tokens).size;
        assert.notEqual(r1.choices[0].text, r0.choices[0].text);
        assert.ok(repeats(r1) < repeats(r0), `repeats ${repeats(r1)} vs ${repeats(r0)}`);
        const g = await generate({ text: 'Lily', max_tokens: 48, logprobs: 0,
                                   sampling: { temperature: 0, presence_penalty: 1.5,
                                               frequency_penalty: 1.0 } });
        assert.equal(g.text, r1.choices[0].text);
        g.logprobs.forEach((t, i) => near(r1.choices[0].logprobs.token_logprobs[i], t.logprob,
                                          1e-5, `token ${i}`));
      });

      await check('stop: text cut before the first stop string', async () => {
        const text = plain.choices[0].text;
        const cut = text.indexOf('. ');
        assert.ok(cut >= 0, `no ". " in ${text}`);
        const r = await client.completions.create({ ...greedy, prompt: P, max_tokens: 32,
                                                    stop: ['zzz', '. ', 'qqq', 'xxx'] });
        assert.equal(r.choices[0].text, text.slice(0, cut));
        assert.equal(r.choices[0].finish_reason, 'stop');
      });

      await check('prompt batches and token-id prompts', async () => {
        const ids = await tokenize(P);
        assert.ok(ids.length > 5);
        const byIds = await client.completions.create({ ...greedy, prompt: ids, max_tokens: 32 });
        assert.equal(byIds.choices[0].text, plain.choices[0].text);
        const lily = await client.completions.create({ ...greedy, prompt: 'Lily', max_tokens: 16 });
        const batch = await client.completions.create({ ...greedy, prompt: [P, 'Lily'],
                                                        max_tokens: 16, n: 2 });
        assert.equal(batch.choices.length, 4);
        assert.deepEqual(batch.choices.map((c) => c.index), [0, 1, 2, 3]);
        const p16 = plain.choices[0].text.slice(0, 0) + embedded(P, 16);
        assert.equal(batch.choices[0].text, p16);
        assert.equal(batch.choices[1].text, p16);
        assert.equal(batch.choices[2].text, lily.choices[0].text);
        assert.equal(batch.choices[3].text, lily.choices[0].text);
        assert.equal(batch.usage.prompt_tokens, plain.usage.prompt_tokens + lily.usage.prompt_tokens);
        const idBatch = await client.completions.create({ ...greedy, prompt: [ids, ids],
                                                          max_tokens: 16 });
        assert.equal(idBatch.choices[0].text, p16);
        assert.equal(idBatch.choices[1].text, p16);
        // echo of a token prompt: its pieces (no BOS).
        const echoed = await client.completions.create({ ...greedy, prompt: ids, max_tokens: 0,
                                                         echo: true });
        assert.equal(echoed.choices[0].text, P);
        assert.equal(echoed.choices[0].logprobs, null);
      });

      await check('user is accepted', async () => {
        const r = await client.completions.create({ ...greedy, prompt: P, max_tokens: 4,
                                                    user: 'user-1234' });
        assert.equal(r.choices[0].text, embedded(P, 4));
      });

      await check('400s name the parameter and its limit', async () => {
        const cases = [
          [{ prompt: P, n: 17 }, 'n', '16'],
          [{ prompt: P, logprobs: 6 }, 'logprobs', '5'],
          [{ prompt: P, presence_penalty: 2.5 }, 'presence_penalty', '[-2, 2]'],
          [{ prompt: P, frequency_penalty: -3 }, 'frequency_penalty', '[-2, 2]'],
          [{ prompt: P, stop: ['a', 'b', 'c', 'd', 'e'] }, 'stop', '4'],
          [{ prompt: [[1, 100000]] }, 'prompt', '512'],
          [{ prompt: new Array(17).fill('x') }, 'prompt', '16'],
          [{ prompt: P, user: 'u'.repeat(257) }, 'user', '256'],
        ];
        for (const [body, param, limit] of cases) {
          const e = await sdkError(client.completions.create({ model: 'stories260K', ...body }));
          assert.ok(e instanceof OpenAI.BadRequestError, `${param}: ${e}`);
          assert.equal(e.status, 400);
          assert.equal(e.param, param, e.message);
          assert.ok(e.message.includes(limit), `${param}: "${e.message}" lacks ${limit}`);
          assert.equal(e.type, 'invalid_request_error');
        }
        const chat = await sdkError(client.chat.completions.create({
          model: 'stories260K', messages: [{ role: 'user', content: 'x' }], logprobs: true,
          top_logprobs: 21 }));
        assert.equal(chat.status, 400);
        assert.equal(chat.param, 'top_logprobs');
        assert.ok(chat.message.includes('20'));
      });

      await check('404 for an unknown model', async () => {
        const e = await sdkError(client.completions.create({ model: 'gpt-4', prompt: P }));
        assert.ok(e instanceof OpenAI.NotFoundError, String(e));
        assert.equal(e.status, 404);
        assert.equal(e.code, 'model_not_found');
        assert.equal(e.param, 'model');
      });

      await check('429: n choices count as n requests against a key', async () => {
        const limited = new OpenAI({ apiKey: oneKey, baseURL: `http://${gateway.addrs.http}/v1`,
                                     maxRetries: 0, timeout: 60000 });
        const one = await limited.completions.create({ ...greedy, prompt: P, max_tokens: 4 });
        assert.equal(one.choices.length, 1);
        const e = await sdkError(limited.completions.create({ ...greedy, prompt: P,
                                                              max_tokens: 4, n: 2 }));
        assert.ok(e instanceof OpenAI.RateLimitError, String(e));
        assert.equal(e.status, 429);
        assert.equal(e.code, 'rate_limit_exceeded');
      });
    }
    stub.close();
  } finally {
    await stopAll();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(() => {
  clearTimeout(watchdog);
  console.log(`${passed} passed, ${failures.length} failed${failures.length ? ': ' + failures.join('; ') : ''}`);
  process.exit(failures.length === 0 && passed > 0 ? 0 : 1);
}, async (e) => {
  console.error(e.stack || e);
  await stopAll();
  process.exit(1);
});
