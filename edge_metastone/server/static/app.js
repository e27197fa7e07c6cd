"use strict";
// The page: streams one chat completion (stream=true) and draws every candidate as it is written,
// each reasoning step coloured by its SPRM score. No libraries: the machine may be offline.

const $ = (id) => document.getElementById(id);
let modelId = null;
let controller = null;

function colour(score) {  // 0 red .. 0.5 yellow .. 1 green
  const s = Math.max(0, Math.min(1, score ?? 0));
  return `hsl(${Math.round(s * 120)}, 75%, 80%)`;
}

function fmt(x) {
  if (x === null || x === undefined) return "–";
  if (x === 0 || x >= 0.01) return x.toFixed(3);
  return x.toExponential(1);
}

class Card {
  constructor(index) {
    this.index = index;
    this.tokens = 0;
    this.closeAfterToken = false;
    this.el = document.createElement("article");
    this.el.className = "cand live";
    this.el.dataset.index = index;
    this.el.innerHTML =
      '<header><span class="idx"></span><span class="badge">★ chosen</span><span class="running">score –</span></header>' +
      '<pre></pre><footer><span class="ans"></span><span class="info">0 tokens</span></footer>';
    this.el.querySelector(".idx").textContent = `#${index}`;
    this.running = this.el.querySelector(".running");
    this.pre = this.el.querySelector("pre");
    this.ans = this.el.querySelector(".ans");
    this.info = this.el.querySelector(".info");
    this.span = this.newSpan();
  }

  newSpan() {
    const s = document.createElement("span");
    this.pre.appendChild(s);
    return s;
  }

  text(t) {
    if (t) this.span.appendChild(document.createTextNode(t));
  }

  token(t) {
    this.tokens += 1;
    this.text(t);
    if (this.closeAfterToken) {  // the delimiter belongs to the step it ends
      this.closeAfterToken = false;
      this.span = this.newSpan();
    }
  }

  step(ev) {  // the engine scores a step just before streaming its delimiter token
    this.span.className = "step";
    this.span.style.background = colour(ev.score);
    this.span.title = `step ${ev.n_steps}: score ${fmt(ev.score)}`;
    this.closeAfterToken = true;
    this.running.textContent = `score ${fmt(ev.running_score)} · ${ev.n_steps} steps`;
    this.running.style.background = colour(ev.running_score);
  }

  finish(ev) {
    this.text(ev.text);
    this.el.classList.remove("live");
    this.info.textContent = `${ev.tokens} tokens · ${ev.finish_reason}`;
  }

  final(c, chosen) {
    this.ans.textContent = c.answer ? `answer ${c.answer}` : "no answer";
    this.running.textContent = `score ${fmt(c.score)} · ${c.step_scores.length} steps`;
    this.running.style.background = c.step_scores.length ? colour(c.score) : "";
    this.info.textContent = `${c.tokens} tokens · ${c.finish_reason}`;
    this.el.classList.remove("live");
    if (chosen) this.el.classList.add("chosen");
  }
}

class Run {
  constructor() {
    this.cards = new Map();
    this.tokens = 0;
    this.t0 = performance.now();
    this.tFirst = null;
    $("candidates").replaceChildren();
  }

  card(i) {
    if (!this.cards.has(i)) {
      const c = new Card(i);
      this.cards.set(i, c);
      const grid = $("candidates");
      const after = [...grid.children].find((el) => Number(el.dataset.index) > i);
      grid.insertBefore(c.el, after ?? null);
    }
    return this.cards.get(i);
  }

  events(list) {
    for (const ev of list) {
      const c = this.card(ev.candidate);
      if (ev.type === "token") {
        this.tokens += 1;
        this.tFirst ??= performance.now();
        c.token(ev.text);
      } else if (ev.type === "step") {
        c.step(ev);
      } else if (ev.type === "finish") {
        c.finish(ev);
      }
    }
    const secs = this.tFirst ? (performance.now() - this.tFirst) / 1000 : 0;
    const rate = secs > 0 ? Math.round(this.tokens / secs) : 0;
    status(`generating: ${this.cards.size} candidates, ${this.tokens} tokens, ${rate} tokens/s`, "running");
  }

  result(r) {
    r.candidates.forEach((c, i) => this.card(i).final(c, i === r.chosen));
    const chosen = r.candidates[r.chosen];
    $("answer").textContent = r.answer || "(no answer)";
    $("answer-meta").textContent =
      `candidate #${r.chosen} of ${r.k} · score ${fmt(chosen.score)} · selected by ${r.strategy}` +
      (r.early_stop ? " · stopped early at the latency budget" : "");
    $("answer-box").hidden = false;
    const sched = $("scheduler");
    sched.replaceChildren();
    const b = document.createElement("b");
    b.textContent = `${r.effort} (k=${r.k})`;
    sched.append("scheduler: ", b, ` — ${r.scheduler.reason}`);
    const t = r.timings;
    const total = r.candidates.reduce((n, c) => n + c.tokens, 0);
    status(
      `done: ${total} tokens in ${t.total_s.toFixed(2)} s · ` +
      `${Math.round(t.decode_tokens_per_s || 0)} tokens/s decoding (all candidates) · ` +
      `queued ${(t.queue_s * 1000).toFixed(0)} ms · prefill ${(t.prefill_s * 1000).toFixed(0)} ms`,
      "done");
  }
}

function status(text, state) {
  const s = $("status");
  s.textContent = text;
  s.dataset.state = state;
}

function request() {
  const body = {
    messages: [{ role: "user", content: $("prompt").value }],
    effort: $("effort").value,
    stream: true,
  };
  if (modelId) body.model = modelId;
  const num = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  if (num("budget") !== null) body.latency_budget = num("budget");
  if (num("temperature") !== null) body.temperature = num("temperature");
  if (num("seed") !== null) body.seed = num("seed");
  return body;
}

async function run(ev) {
  ev.preventDefault();
  if (!$("prompt").value.trim()) return;
  controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  $("answer-box").hidden = true;
  $("scheduler").textContent = "";
  status("waiting for the model…", "waiting");
  document.body.dataset.chunks = 0;  // progress chunks received (the page's tests read it)
  const r = new Run();
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(request()),
      signal: controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => null);
      status(`error ${resp.status}: ${err?.error?.message ?? resp.statusText}`, "error");
      return;
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const obj = JSON.parse(line.slice(6));
          if (obj.error) {
            status(`error: ${obj.error.message}`, "error");
            continue;
          }
          const m = obj.metastone;
          if (m?.events?.length) {
            document.body.dataset.chunks = Number(document.body.dataset.chunks || 0) + 1;
            r.events(m.events);
          }
          if (m?.result) r.result(m.result);
        }
      }
    }
  } catch (e) {
    status(e.name === "AbortError" ? "stopped" : `error: ${e.message}`, e.name === "AbortError" ? "idle" : "error");
  } finally {
    $("run").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models");
    const m = (await resp.json()).data[0];
    modelId = m.id;
    const x = m.metastone;
    $("model").textContent =
      `${m.id} · ${x.has_head ? "SPRM head" : "no SPRM head"} · default selector ${x.default_strategy} · context ${x.context_length}`;
  } catch (e) {
    $("model").textContent = "model unavailable";
  }
}

$("ask").addEventListener("submit", run);
$("stop").addEventListener("click", () => controller?.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit();
});
loadModel();
