// meshllm console: renders the node's status (pushed by GET api/events) and chats through the
// node's OpenAI API (relayed by the console at v1/). Plain browser JavaScript, no build step.
// Every field of the status may be missing or odd: the helpers below turn them into safe defaults.
"use strict";

const WARN_FRACTION = 0.8;
const TIMELINE_MAX = 50;

const arr = (x) => (Array.isArray(x) ? x : []);
const num = (x) => (typeof x === "number" && isFinite(x) ? x : 0);
const str = (x) => (x === null || x === undefined ? "" : String(x));
const obj = (x) => (x && typeof x === "object" && !Array.isArray(x) ? x : {});
const short = (id) => str(id).slice(0, 8);
const esc = (x) =>
  str(x).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const pct = (f) => (Math.max(0, Math.min(1, f)) * 100).toFixed(3) + "%";
const clamp01 = (f) => Math.max(0, Math.min(1, num(f)));

function bytes(n) {
  n = num(n);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

// A stable colour per model name, so a model keeps its colour in every bar.
function hue(name) {
  let h = 0;
  for (const c of str(name)) h = (h * 31 + c.charCodeAt(0)) % 360;
  return h;
}

// --- deriving what to draw from a status --------------------------------------------------------

function nodesOf(s) {
  const self = {
    id: str(s.node_id),
    name: str(s.name),
    role: str(s.role) || "active",
    vram: num(s.vram_bytes),
    gpus: arr(s.gpus).map(obj),
    serving: [],
    sizes: {},
    self: true,
  };
  const peers = arr(s.peers)
    .map(obj)
    .map((p) => ({
      id: str(p.node_id),
      name: str(p.name),
      role: str(p.role) || "active",
      vram: num(p.vram_bytes),
      gpus: arr(p.gpus).map(obj),
      serving: arr(p.serving).map(str),
      sizes: obj(p.model_bytes),
      self: false,
    }))
    .filter((p) => p.id && p.id !== self.id)
    .sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
  return self.id ? [self, ...peers] : peers;
}

// Per node: one segment per model it runs (whole size) or holds as a split share (fraction x size).
// A model's size: this node's figure, else what a node that has it announces (peers' models are
// known here only by their announcements).
function sizeOf(name, models, nodes) {
  const m = models.find((x) => x.name === name);
  if (m && m.size > 0) return m.size;
  return nodes.reduce((best, n) => Math.max(best, num(obj(n.sizes)[name])), 0);
}

function usageOf(nodes, models) {
  const use = new Map(nodes.map((n) => [n.id, new Map()]));
  const put = (id, model, size, part) => {
    const segs = use.get(str(id));
    if (segs && !segs.has(model)) segs.set(model, { model, bytes: size, part });
  };
  for (const m of models) {
    const workers = arr(m.workers).map(str);
    if (workers.length && m.host) {
      const parts = [str(m.host), ...workers];
      const fr = arr(m.fractions);
      parts.forEach((id, i) => {
        const f = fr.length === parts.length ? num(fr[i]) : 1 / parts.length;
        put(id, m.name, sizeOf(m.name, models, nodes) * f, i === 0 ? "host" : "worker");
      });
    }
    for (const id of arr(m.hosts)) put(id, m.name, sizeOf(m.name, models, nodes), "serving");
  }
  for (const n of nodes) {
    for (const name of n.serving) put(n.id, name, sizeOf(name, models, nodes), "serving");
  }
  return use;
}

function modelsOf(s) {
  return arr(s.models)
    .map(obj)
    .filter((m) => str(m.name))
    .map((m) => {
      const dl = m.download && typeof m.download === "object" ? m.download : null;
      let state = str(m.state) || "unknown";
      if (dl && ["resolving", "described", "downloading"].includes(str(dl.state))) state = "downloading";
      if (dl && str(dl.state) === "refused") state = "refused";
      return { ...m, name: str(m.name), size: num(m.size_bytes), state, download: dl };
    });
}

// --- rendering -----------------------------------------------------------------------------------

function bar(cls, fraction, inner, attrs) {
  const f = clamp01(fraction);
  const warn = f > WARN_FRACTION ? " warn" : "";
  return (
    `<div class="bar ${cls}" ${attrs || ""}><div class="fill${warn}" style="width:${pct(f)}">` +
    (inner || "") +
    `</div></div>`
  );
}

function renderNode(n, segs, maxVram, modelHosts) {
  const list = [...segs.values()];
  const used = list.reduce((a, x) => a + num(x.bytes), 0);
  const frac = n.vram > 0 ? clamp01(used / n.vram) : 0;
  const parts = new Set(list.map((x) => x.part));
  const badges = [];
  if (n.role !== "active") badges.push(n.role);
  if (parts.has("host") || modelHosts.has(n.id)) badges.push("host");
  if (parts.has("worker")) badges.push("worker");
  if (parts.has("serving")) badges.push("serving");
  if (!list.length) badges.push("idle");
  const segHtml = list
    .map((x) => {
      const w = used > 0 ? (num(x.bytes) / used) * 100 : 0;
      const unknown = num(x.bytes) > 0 ? "" : " unknown";
      const title = `${x.model} (${x.part}): ${num(x.bytes) > 0 ? bytes(x.bytes) : "size unknown"}`;
      return `<span class="seg${unknown}" data-model="${esc(x.model)}" title="${esc(title)}" style="width:${w.toFixed(3)}%;background:hsl(${hue(x.model)} 55% 50%)"></span>`;
    })
    .join("");
  const gpus = n.gpus
    .map((g) => {
      const total = num(g.total_bytes);
      const usedG = Math.max(0, total - num(g.free_bytes));
      const f = total > 0 ? usedG / total : 0;
      return (
        `<div class="gpu"><span class="gpu-name">${esc(str(g.name) || "GPU " + str(g.index))}</span>` +
        bar("gpu-bar", f, "", `data-used-fraction="${clamp01(f).toFixed(3)}"`) +
        `<span class="muted">${bytes(usedG)} / ${bytes(total)}</span></div>`
      );
    })
    .join("");
  const models = list.map((x) => `${esc(x.model)}${x.part === "serving" ? "" : " (" + x.part + ")"}`).join(", ");
  return (
    `<div class="node${n.self ? " self" : ""}" data-node-id="${esc(n.id)}" data-vram-bytes="${n.vram}" data-used-bytes="${Math.round(used)}">` +
    `<div class="node-head"><span class="node-name">${esc(n.name || short(n.id))}</span>` +
    `<code class="muted">${esc(short(n.id))}</code>${n.self ? '<span class="badge you">this node</span>' : ""}` +
    badges.map((b) => `<span class="badge ${esc(b)}">${esc(b)}</span>`).join("") +
    `</div>` +
    `<div class="row"><span class="label">capacity</span>` +
    bar("capacity", maxVram > 0 ? n.vram / maxVram : 0, "", `data-capacity-fraction="${(maxVram > 0 ? n.vram / maxVram : 0).toFixed(3)}"`) +
    `<span class="muted">${bytes(n.vram)}</span></div>` +
    `<div class="row"><span class="label">used</span>` +
    bar("usage", frac, segHtml, `data-used-fraction="${frac.toFixed(3)}"`) +
    `<span class="${frac > WARN_FRACTION ? "warn-text" : "muted"}">${(frac * 100).toFixed(0)}%</span></div>` +
    (models ? `<div class="node-models muted">${models}</div>` : "") +
    gpus +
    `</div>`
  );
}

function nameOf(names, id) {
  return esc(names.get(str(id)) || short(id) || "?");
}

function renderModel(m, names) {
  const host = str(m.host);
  const workers = arr(m.workers).map(str);
  const hosts = arr(m.hosts).map(str);
  let what = "";
  let extra = "";
  if (m.state === "split" || (workers.length && host)) {
    const parts = [host, ...workers];
    const fr = arr(m.fractions);
    what = `split: host ${nameOf(names, host)}, workers ${workers.map((w) => nameOf(names, w)).join(", ")}`;
    extra =
      `<div class="bar split">` +
      parts
        .map((id, i) => {
          const f = fr.length === parts.length ? num(fr[i]) : 1 / parts.length;
          return `<span class="seg" data-node-id="${esc(id)}" style="width:${pct(f)};background:hsl(${(i * 67) % 360} 45% 45%)">${nameOf(names, id)} ${(f * 100).toFixed(0)}%</span>`;
        })
        .join("") +
      `</div>`;
  } else if (m.state === "solo") {
    const on = hosts.length ? hosts : [host];
    what = `solo on ${on.map((h) => nameOf(names, h)).join(", ")}`;
  } else if (m.state === "waiting") {
    const need = num(m.needed_bytes);
    const have = num(m.available_bytes);
    what = need > 0 ? `waiting: needs ${bytes(need)}, ${bytes(have)} available (short ${bytes(Math.max(0, need - have))})` : "waiting";
  } else if (m.state === "downloading") {
    const d = obj(m.download);
    const total = num(d.total_bytes);
    const done = num(d.done_bytes);
    what = `downloading ${bytes(done)}${total > 0 ? " / " + bytes(total) : ""}${num(d.rate_bytes_s) > 0 ? " at " + bytes(d.rate_bytes_s) + "/s" : ""}`;
    extra = bar("progress", total > 0 ? done / total : 0, "", `data-progress="${(total > 0 ? done / total : 0).toFixed(3)}"`);
  } else if (m.state === "refused") {
    what = `refused: ${esc(str(obj(m.download).reason) || str(m.detail) || "does not fit")}`;
  } else {
    what = esc(m.state);
  }
  if (hosts.length && m.state !== "solo") what += ` · hosts ${hosts.map((h) => nameOf(names, h)).join(", ")}`;
  const detail = str(m.detail) && m.state !== "refused" ? `<div class="muted">${esc(m.detail)}</div>` : "";
  const demand = num(m.demand_per_min) > 0 ? `<span class="demand">${num(m.demand_per_min).toFixed(1)} req/min</span>` : "";
  const size = m.size > 0 ? `<span class="muted">${bytes(m.size)}</span>` : "";
  return (
    `<div class="model" data-model="${esc(m.name)}" data-state="${esc(m.state)}">` +
    `<div class="model-head"><span class="swatch" style="background:hsl(${hue(m.name)} 55% 50%)"></span>` +
    `<span class="model-name">${esc(m.name)}</span><span class="badge state-${esc(m.state)}">${esc(m.state)}</span>${size}${demand}</div>` +
    `<div class="model-what">${what}</div>${extra}${detail}</div>`
  );
}

function renderPassive(s, timeline) {
  const passive = num(s.passive_connections);
  const standbys = num(s.standby_connections);
  const sb = obj(s.standby);
  let html =
    `<div class="counts"><span data-clients="${Math.max(0, passive - standbys)}"><b>${Math.max(0, passive - standbys)}</b> clients</span>` +
    `<span data-standbys="${standbys}"><b>${standbys}</b> standbys</span></div>`;
  if (s.standby) {
    html += `<div class="muted">this node's standby offers: ${arr(sb.offers).map(esc).join(", ") || "none"}`;
    if (str(sb.pending)) html += ` · about to take ${esc(sb.pending)} (${esc(sb.pending_reason)})`;
    if (str(sb.promoted_for)) html += ` · promoted for ${esc(sb.promoted_for)}`;
    html += `</div>`;
  }
  const promos = timeline.filter((e) => e.kind === "promoted" || e.kind === "promoting" || e.kind === "demoted").slice(0, 5);
  if (promos.length) {
    const seen = lastPromotionSeq === null ? Infinity : lastPromotionSeq; // the first render marks none
    html +=
      `<ul class="promotions">` +
      promos.map((e) => `<li class="${num(e.seq) > seen ? "fresh" : ""}">${timelineText(e)}</li>`).join("") +
      `</ul>`;
    lastPromotionSeq = Math.max(lastPromotionSeq || 0, ...promos.map((e) => num(e.seq)));
  } else if (lastPromotionSeq === null) {
    lastPromotionSeq = 0;
  }
  return html;
}
let lastPromotionSeq = null;

function timelineText(e) {
  const when = str(e.ts) ? new Date(e.ts) : null;
  const t = when && !isNaN(when) ? when.toLocaleTimeString() : "";
  return (
    `<time>${esc(t)}</time> <span class="badge kind-${esc(e.kind)}">${esc(e.kind)}</span> ` +
    `<b>${esc(str(e.name) || short(e.node_id))}</b> <code class="muted">${esc(short(e.node_id))}</code>` +
    (str(e.model) ? ` <span class="model-ref">${esc(e.model)}</span>` : "") +
    (str(e.text) ? ` <span class="muted">${esc(e.text)}</span>` : "")
  );
}

function render(s) {
  const t0 = performance.now();
  s = obj(s);
  const nodes = nodesOf(s);
  const models = modelsOf(s);
  const names = new Map(nodes.map((n) => [n.id, n.name || short(n.id)]));
  const usage = usageOf(nodes, models);
  const maxVram = nodes.reduce((a, n) => Math.max(a, n.vram), 0);
  const splitHosts = new Set(models.filter((m) => arr(m.workers).length).map((m) => str(m.host)));
  document.getElementById("whoami").innerHTML =
    `<b>${esc(s.name)}</b> <code>${esc(short(s.node_id))}</code> <span class="badge">${esc(str(s.role) || "?")}</span>` +
    (s.mesh_id ? ` <span class="muted">mesh ${esc(s.mesh_id)}</span>` : "");
  document.getElementById("api").textContent = str(s.api_url) ? "API " + str(s.api_url) : "";
  document.getElementById("node-count").textContent = `(${nodes.length})`;
  document.getElementById("nodes").innerHTML = nodes
    .map((n) => renderNode(n, usage.get(n.id) || new Map(), maxVram, splitHosts))
    .join("");
  document.getElementById("models").innerHTML =
    models.map((m) => renderModel(m, names)).join("") || `<div class="muted">no models</div>`;
  const timeline = arr(s.timeline).map(obj).slice(0, TIMELINE_MAX);
  document.getElementById("passive").innerHTML = renderPassive(s, timeline);
  document.getElementById("timeline").innerHTML =
    timeline.map((e) => `<li data-kind="${esc(e.kind)}">${timelineText(e)}</li>`).join("") ||
    `<li class="muted">nothing yet</li>`;
  refreshModelsIfChanged(models);
  window.meshllmConsole.renders += 1;
  window.meshllmConsole.lastRenderMs = performance.now() - t0;
  window.meshllmConsole.status = s;
}

// --- live updates --------------------------------------------------------------------------------

window.meshllmConsole = { renders: 0, lastRenderMs: 0, status: null, connected: false };

function setConn(state, text) {
  const el = document.getElementById("conn");
  el.dataset.state = state;
  el.textContent = text;
  window.meshllmConsole.connected = state === "live";
}

function showError(err) {
  const el = document.getElementById("error");
  el.hidden = false;
  el.textContent = "console error: " + str(err && err.message ? err.message : err);
  console.error(err); // eslint-disable-line no-console
}

function connect() {
  const source = new EventSource("api/events");
  source.onopen = () => setConn("live", "live");
  source.onmessage = (ev) => {
    let status;
    try {
      status = JSON.parse(ev.data);
    } catch (err) {
      showError(err);
      return;
    }
    try {
      render(status);
      document.getElementById("error").hidden = true;
    } catch (err) {
      showError(err);
    }
  };
  source.onerror = () => {
    setConn("reconnecting", "reconnecting…");
    // EventSource retries by itself unless the answer was not an event stream; then start over,
    // unless the console wants a key (its login cookie expired or the keys changed): log in again.
    if (source.readyState === EventSource.CLOSED) {
      fetch("api/status")
        .then((resp) => {
          if (resp.status === 401) window.location.reload();
          else setTimeout(connect, 1000);
        })
        .catch(() => setTimeout(connect, 1000));
    }
  };
}

// --- chat ----------------------------------------------------------------------------------------

let knownModels = "";
const chatHistory = [];

function refreshModelsIfChanged(models) {
  const key = models.map((m) => m.name + ":" + arr(m.hosts).length).join(",");
  if (key !== knownModels) {
    knownModels = key;
    loadModels();
  }
}

async function loadModels() {
  const select = document.getElementById("chat-model");
  try {
    const resp = await fetch("v1/models");
    if (!resp.ok) return;
    const ids = arr(obj(await resp.json()).data).map((d) => str(obj(d).id)).filter(Boolean);
    const current = select.value;
    select.innerHTML = ids.map((id) => `<option value="${esc(id)}">${esc(id)}</option>`).join("");
    if (ids.includes(current)) select.value = current;
    select.dataset.loaded = String(ids.length);
  } catch (_err) {
    // The API may be down for a moment; the next status change tries again.
  }
}

function bubble(role, text) {
  const log = document.getElementById("chat-log");
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.textContent = text;
  log.appendChild(el);
  log.scrollTop = log.scrollHeight;
  return el;
}

async function sendChat(ev) {
  ev.preventDefault();
  const input = document.getElementById("chat-input");
  const model = document.getElementById("chat-model").value;
  const text = input.value.trim();
  if (!text) return;
  if (!model) {
    bubble("error", "no model is served yet");
    return;
  }
  input.value = "";
  bubble("user", text);
  chatHistory.push({ role: "user", content: text });
  const out = bubble("assistant", "");
  out.dataset.done = "false";
  const button = document.getElementById("chat-send");
  button.disabled = true;
  let reply = "";
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: chatHistory, stream: true, max_tokens: 256 }),
    });
    if (!resp.ok || !resp.body) {
      const body = await resp.text();
      let msg = body;
      try {
        msg = str(obj(obj(JSON.parse(body)).error).message) || body;
      } catch (_e) { /* not JSON */ }
      throw new Error(`${resp.status}: ${msg}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        try {
          const delta = obj(obj(arr(obj(JSON.parse(data)).choices)[0]).delta);
          reply += str(delta.content);
          out.textContent = reply;
        } catch (_e) { /* a partial or foreign line */ }
      }
    }
    chatHistory.push({ role: "assistant", content: reply });
  } catch (err) {
    out.classList.add("error");
    out.textContent = (reply ? reply + "\n" : "") + "error: " + str(err && err.message ? err.message : err);
    chatHistory.pop();
  } finally {
    out.dataset.done = "true";
    button.disabled = false;
  }
}

document.getElementById("chat-form").addEventListener("submit", sendChat);
document.getElementById("chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    document.getElementById("chat-form").requestSubmit();
  }
});
connect();
