"use strict";
// The page: streams one chat completion (stream=true) and draws every candidate as it is written,
// each reasoning step coloured by the signal that informs on this model: its SPRM score, or, where
// the model's head was measured uninformative (its provenance), the model's own confidence in the
// step (the geometric-mean probability of the step's tokens). No libraries: the machine may be
// offline.

const $ = (id) => document.getElementById(id);
const SCORE_FLOOR = 1e-10;  // the trajectory score clamps each step here (not a measurement)
let modelId = null;
let about = {};  // the model card's `metastone.about`: name, task, domain, step_signal, sprm_label
let strategies = {};  // the model card's `metastone.strategies`: each selector's vote and signal
let controller = null;
let current = null;  // the Run on screen

const byConfidence = () => about.step_signal === "confidence";
const sprmLabel = () => about.sprm_label || "SPRM";

function hue(s) {  // 0 red .. 0.5 yellow .. 1 green
  const x = Math.max(0, Math.min(1, s ?? 0));
  return `hsl(${Math.round(x * 120)}, 75%, 80%)`;
}

// confidence: 0.5 or less is red, 1 green (a step the model doubts is rarely below 0.5)
const confidenceColour = (c) => hue((c - 0.5) / 0.5);
const stepColour = (score, confidence) =>
  byConfidence() && confidence != null ? confidenceColour(confidence) : hue(score);

function fmt(x) {
  if (x === null || x === undefined) return "–";
  if (x === 0 || x >= 0.01) return x.toFixed(3);
  return x.toExponential(1);
}

function fmtSprm(score, steps) {  // a geometric mean with a step at the floor is not a measurement
  if (steps?.some((s) => s <= SCORE_FLOOR)) return "≈0 (a step scored ≈0)";
  return fmt(score);
}

function legend() {
  const el = $("legend");
  el.replaceChildren();
  const stops = byConfidence() ? [0.5, 0.625, 0.75, 0.875, 1] : [0, 0.25, 0.5, 0.75, 1];
  el.append(byConfidence() ? "step confidence " : "step SPRM score ");
  for (const v of stops) {
    const s = document.createElement("span");
    s.className = "swatch";
    s.style.background = byConfidence() ? confidenceColour(v) : hue(v);
    s.textContent = (v === 0.5 && byConfidence() ? "≤" : "") + String(v).replace(/^0\./, ".");
    el.append(s);
  }
  const hint = document.createElement("span");
  hint.className = "hint";
  hint.textContent = byConfidence()
    ? "steps are coloured by the model's own confidence (geometric-mean probability of the " +
      `step's tokens); ${sprmLabel()} is in each step's tooltip and card`
    : "each reasoning step is coloured by its SPRM score; a card's header shows its running trajectory score";
  el.append(hint);
}

function selectorValue(r, c) {  // the number the selector chose the candidate by
  const s = r.strategy;
  const how = strategies[s] || {};  // /v1/models says which selectors vote and by what
  if (how.signal === "logprob" || (how.signal === "sprm" && c.score === null))
    return `selected by mean token log-prob ${c.mean_logprob?.toFixed(3) ?? "–"} (highest of ${r.k})`;
  if (how.vote) {
    const n = r.candidates.filter((x) => x.answer === c.answer).length;
    return `selected by ${s}: ${n} of ${r.k} candidates answer ${c.answer || "nothing"}`;
  }
  return `selected by ${s}: ${sprmLabel()} ${fmtSprm(c.score, c.step_scores)}`;
}

class Card {
  constructor(index) {
    this.index = index;
    this.tokens = 0;
    this.ended = false;
    this.lowest = null;  // the lowest step confidence so far
    this.closeAfterToken = false;
    this.el = document.createElement("article");
    this.el.className = "cand live";
    this.el.dataset.index = index;
    this.el.innerHTML =
      '<header><span class="idx"></span><span class="badge">★ chosen</span><span class="state"></span>' +
      '<button type="button" class="same"></button><span class="running">–</span>' +
      '<span class="selector"></span><span class="sprm"></span></header>' +
      '<pre></pre><footer><span class="ans"></span><span class="info">0 tokens</span></footer>';
    const q = (sel) => this.el.querySelector(sel);
    q(".idx").textContent = `#${index}`;
    [this.running, this.pre, this.ans, this.info] = [q(".running"), q("pre"), q(".ans"), q(".info")];
    [this.state, this.selector, this.sprm] = [q(".state"), q(".selector"), q(".sprm")];
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
    this.info.textContent = `${this.tokens} tokens`;
    this.text(t);
    if (this.closeAfterToken) {  // the delimiter belongs to the step it ends
      this.closeAfterToken = false;
      this.span = this.newSpan();
    }
  }

  step(ev) {  // the engine scores a step just before streaming its delimiter token
    this.span.className = "step";
    this.span.style.background = stepColour(ev.score, ev.confidence);
    const sprm = `${sprmLabel()} ${fmt(ev.score)}`;
    this.span.title = ev.confidence != null
      ? `step ${ev.n_steps}: confidence ${fmt(ev.confidence)} · ${sprm}`
      : `step ${ev.n_steps}: ${sprm}`;
    this.closeAfterToken = true;
    if (byConfidence() && ev.confidence != null) {
      this.lowest = Math.min(this.lowest ?? 1, ev.confidence);
      this.running.textContent = `${ev.n_steps} steps · least sure ${fmt(this.lowest)}`;
      this.running.style.background = confidenceColour(this.lowest);
    } else {
      this.running.textContent = `score ${fmt(ev.running_score)} · ${ev.n_steps} steps`;
      this.running.style.background = hue(ev.running_score);
    }
  }

  finish(ev) {
    this.text(ev.text);
    this.ended = true;
    this.el.classList.remove("live");
    this.info.textContent = `${ev.tokens} tokens · ${ev.finish_reason}`;
    if (ev.stopped_early) this.stop(`stopped (${ev.stopped_early})`);
  }

  stop(label) {  // ended before its turn did: grey, with why
    this.el.classList.remove("live");
    this.el.classList.add("stopped");
    this.state.textContent = label;
  }

  final(c, chosen, r) {
    this.ended = true;
    this.ans.textContent = c.answer ? `answer ${c.answer}` : "no answer";
    const n = c.step_scores.length;
    const conf = (c.step_confidence || []).filter((x) => x != null);
    if (byConfidence() && c.mean_logprob != null) {
      this.running.textContent = `mean log-prob ${c.mean_logprob.toFixed(3)} · ${n} steps`;
      this.running.style.background = confidenceColour(Math.exp(c.mean_logprob));
      this.sprm.textContent = n ? `${sprmLabel()}: ${fmtSprm(c.score, c.step_scores)}` : "";
      if (conf.length) this.running.title = `least sure step ${fmt(Math.min(...conf))}`;
    } else {
      this.running.textContent = `score ${fmtSprm(c.score, c.step_scores)} · ${n} steps`;
      this.running.style.background = n ? hue(c.score) : "";
    }
    this.info.textContent = `${c.tokens} tokens · ${c.finish_reason}` +
      (c.thought_ended ? " · thought ended by the thinking budget" : "");
    this.el.classList.remove("live");
    if (chosen) {
      this.el.classList.add("chosen");
      this.selector.textContent = selectorValue(r, c);
    }
  }
}

function tally(r) {  // "86 ×6, 84 ×2": the answers, most frequent first
  const counts = new Map();
  for (const c of r.candidates) counts.set(c.answer, (counts.get(c.answer) || 0) + 1);
  const el = $("tally");
  el.replaceChildren();
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = `answers of ${r.candidates.length} candidates: `;
  el.append(label);
  const chosen = r.candidates[r.chosen]?.answer;
  for (const [answer, n] of [...counts].sort((a, b) => b[1] - a[1])) {
    if (el.children.length > 1) el.append(", ");
    const g = document.createElement("span");
    g.className = "group" + (answer === chosen ? " chosen" : "");
    g.textContent = `${answer || "no answer"} ×${n}`;
    el.append(g);
  }
  el.hidden = false;
}

class Run {
  constructor() {
    this.cards = new Map();
    this.tokens = 0;
    this.waves = 0;
    this.t0 = performance.now();
    this.tFirst = null;
    $("candidates").replaceChildren();
    $("candidates").classList.remove("expanded");
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
      if (ev.type === "wave") {
        this.waves = Math.max(this.waves, ev.wave || 0);
        continue;
      }
      if (ev.candidate === undefined) continue;  // an event this page does not know
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
    const waves = this.waves > 1 ? ` in ${this.waves} waves` : "";
    status(`generating: ${this.cards.size} candidates${waves}, ${this.tokens} tokens, ${rate} tokens/s`, "running");
  }

  stopped() {  // the person pressed Stop: keep what was written, marked
    let n = 0;
    for (const c of this.cards.values()) {
      if (!c.ended) {
        c.stop("stopped");
        n += 1;
      }
    }
    status(`stopped: ${this.cards.size} candidates kept (${n} unfinished), ${this.tokens} tokens`, "stopped");
  }

  group(r) {  // identical candidates: one card shows, the others fold behind its "+N identical"
    const groups = new Map();
    for (const c of r.candidates) {
      const key = c.text;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(c.index ?? r.candidates.indexOf(c));
    }
    for (const members of groups.values()) {
      if (members.length < 2) continue;
      const head = members.includes(r.chosen) ? r.chosen : members[0];
      const dups = members.filter((i) => i !== head).map((i) => this.card(i));
      const card = this.card(head);
      card.el.classList.add("group-head");
      const button = card.el.querySelector(".same");
      const label = () => (dups[0].el.classList.contains("shown") ? "hide " : "+") + `${dups.length} identical`;
      dups.forEach((d) => d.el.classList.add("dup"));
      button.textContent = label();
      button.title = `candidates ${dups.map((d) => "#" + d.index).join(", ")} wrote the same text`;
      button.addEventListener("click", () => {
        dups.forEach((d) => d.el.classList.toggle("shown"));
        button.textContent = label();
      });
    }
  }

  result(r) {
    r.candidates.forEach((c, i) => this.card(i).final(c, i === r.chosen, r));
    this.group(r);
    tally(r);
    const doubtful = warn(r.warnings || []);
    const chosen = r.candidates[r.chosen];
    $("answer").textContent = r.answer || "(no answer)";
    $("answer-meta").textContent =
      `candidate #${r.chosen} of ${r.k} · ${selectorValue(r, chosen)}` +
      (r.early_stop ? " · stopped early at the latency budget" : "") +
      (r.waves && r.waves.length ? ` · ${r.waves.length} wave${r.waves.length > 1 ? "s" : ""}` +
        (r.stop_reason ? `, ${r.stop_reason}` : "") : "");
    $("answer-box").classList.toggle("doubtful", doubtful);
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

function warn(warnings) {  // the server's warnings (a prompt outside the model's task); true if any
  const el = $("warning");
  el.replaceChildren();
  for (const w of warnings) {
    const line = document.createElement("div");
    const b = document.createElement("b");
    b.textContent = "Warning: ";
    line.append(b, `${w}. The model answers such prompts all the same: do not trust the answer below.`);
    el.append(line);
  }
  el.hidden = warnings.length === 0;
  return warnings.length > 0;
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

function failed(text) {  // an error line, and no answer (or warning) from this or an earlier run
  $("answer-box").hidden = true;
  $("warning").hidden = true;
  status(text, "error");
}

async function read(resp, r) {
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
          failed(`error: ${obj.error.message}`);
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
}

async function run(ev) {
  ev.preventDefault();
  if (!$("prompt").value.trim()) return;
  controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  $("answer-box").hidden = true;
  $("warning").hidden = true;
  $("tally").hidden = true;
  $("scheduler").textContent = "";
  status("waiting for the model…", "waiting");
  document.body.dataset.chunks = 0;  // progress chunks received (the page's tests read it)
  const r = (current = new Run());
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(request()),
      signal: controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => null);
      failed(`error ${resp.status}: ${err?.error?.message ?? resp.statusText}`);
      return;
    }
    await read(resp, r);
  } catch (e) {
    if (e.name === "AbortError") r.stopped();
    else failed(`error: ${e.message}`);
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
    about = x.about || {};
    strategies = x.strategies || {};
    const el = $("model");
    el.replaceChildren();
    const name = document.createElement("b");
    name.textContent = about.name || m.id;
    el.append(name);
    if (about.task) el.append(` · ${about.task}`);
    el.append(
      ` · ${x.has_head ? (about.head_informative === false ? sprmLabel() : "SPRM head") : "no SPRM head"}` +
      ` · default selector ${x.default_strategy} · context ${x.context_length}`);
    if (x.prompt_format && x.prompt_format !== "file") {  // a fallback format, or none at all
      const fmt = document.createElement("span");
      fmt.className = "format";
      fmt.textContent = ` · prompt format ${x.prompt_format_reason}`;
      el.append(fmt);
    }
    if (about.domain) {
      $("domain").textContent =
        `${about.name || m.id} can do ${about.domain}. Other prompts still get a number, not a meaningful answer.`;
      $("domain").hidden = false;
    }
  } catch (e) {
    $("model").textContent = "model unavailable";
  }
  legend();
}

$("ask").addEventListener("submit", run);
$("stop").addEventListener("click", () => controller?.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit();
});
loadModel();
