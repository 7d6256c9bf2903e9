// The playground: tasks, and a form that runs one input on two tasks side by side.
// Every value from the server is written as text (textContent, never innerHTML);
// the page's Content-Security-Policy allows no inline script and no eval.

const $ = (selector) => document.querySelector(selector);
const TOKEN_KEY = "ptserve-token";
let tasks = [];
const versionsOf = new Map(); // task id -> its kept versions' summaries, newest first (GET .../versions)

// -- talking to the server -----------------------------------------------------

class ServerError extends Error {}

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function messageOf(response) {
  try {
    const body = await response.json();
    const detail = body.error?.message ?? body.detail;
    return typeof detail === "string" ? detail : JSON.stringify(detail);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// fetch, with the token if one is kept; a 401 or 403 asks for a token and tries once more
async function api(path, options = {}, retried = false) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if ((response.status === 401 || response.status === 403) && !retried) {
    if (await askToken(await messageOf(response))) return api(path, options, true);
  }
  if (!response.ok) throw new ServerError(await messageOf(response));
  return response;
}

let asking = null; // the open token dialog's answer: requests refused meanwhile wait for the same one

function askToken(why) {
  if (asking) return asking;
  const dialog = $("#token-dialog");
  $("#token-why").textContent = why;
  $("#token-input").value = "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const token = $("#token-input").value.trim();
      asking = null;
      if (dialog.returnValue === "ok" && token) {
        sessionStorage.setItem(TOKEN_KEY, token);
        resolve(true);
      } else {
        resolve(false);
      }
    }, { once: true });
    dialog.showModal();
  });
  return asking;
}

// an error as the page shows it: the server's own words (after `refused`), or what failed here
function describe(error, refused = "") {
  return error instanceof ServerError ? `${refused}${error.message}` : `Error: ${error.message ?? error}`;
}

function showError(error) {
  const box = $("#error");
  box.textContent = describe(error);
  box.hidden = false;
}

function clearError() {
  $("#error").hidden = true;
}

// -- tasks ---------------------------------------------------------------------

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

async function loadTasks() {
  tasks = await (await api("/v1/tasks")).json();
  const list = $("#tasks");
  list.replaceChildren(...tasks.map((task) => {
    const button = element("button", task.task_id, { type: "button", "data-task": task.task_id });
    button.addEventListener("click", () => showTask(task));
    const item = element("li");
    const older = (task.versions ?? []).slice(1);
    const kept = older.length ? ` (older kept: ${older.join(", ")})` : "";
    item.append(button, element("span", ` ${task.task_type}, version ${task.version}${kept}`, { class: "muted" }));
    return item;
  }));
  $("#tasks-empty").hidden = tasks.length > 0;
  for (const select of document.querySelectorAll("select[name=task]")) {
    const keep = select.value;
    const blank = [...select.options].filter((option) => option.hasAttribute("data-static"));
    select.replaceChildren(...blank, ...tasks.map((task) => element("option", task.task_id, { value: task.task_id })));
    if ([...select.options].some((option) => option.value === keep)) select.value = keep;
  }
  versionsOf.clear();
  await Promise.all(["a", "b"].map(showVersions));
}

function taskNamed(id) {
  return tasks.find((task) => task.task_id === id);
}

function showTask(task) {
  $("#task-detail").hidden = false;
  $("#detail-title").textContent = task.task_id;
  const rows = [
    ["Type", task.task_type],
    ["Version", task.version],
    ["Versions kept", (task.versions ?? [task.version]).map((v, i) => i ? String(v) : `${v} (latest)`).join(", ")],
    ["Template", task.template],
    ["Virtual tokens", task.num_virtual_tokens],
    ["Base model", task.base_model?.name_or_path ?? ""],
  ];
  if (task.labels) {
    rows.push(["Labels", Object.entries(task.labels).map(([label, word]) => `${label} → ${JSON.stringify(word)}`).join("; ")]);
  }
  if (task.description) rows.push(["Description", task.description]);
  const m = task.metrics;
  if (m) {
    const key = "dev_accuracy" in m ? "dev_accuracy" : "dev_loss";
    rows.push([`Dev ${key.slice(4)}`, `${fmt(m[`start_${key}`])} at the start → ${fmt(m[key])} (epoch ${m.best_epoch} of ${m.epochs_run})`]);
    rows.push(["Data", `${m.train_examples} training and ${m.dev_examples} dev examples`]);
  }
  $("#detail-fields").replaceChildren(...rows.flatMap(([name, value]) => [element("dt", name), element("dd", value)]));
  $("#delete-task").dataset.task = task.task_id;
}

function fmt(value) {
  return typeof value === "number" ? value.toFixed(3) : String(value ?? "?");
}

async function deleteTask() {
  const id = $("#delete-task").dataset.task;
  if (!id || !window.confirm(`Delete task ${id} and its stored prompt?`)) return;
  try {
    await api(`/v1/tasks/${encodeURIComponent(id)}`, { method: "DELETE" });
    $("#task-detail").hidden = true;
    await loadTasks();
  } catch (error) {
    showError(error);
  }
}

// -- trying ----------------------------------------------------------------------

// a template's fields, in order: {name} holes ({{ and }} are literal braces)
function templateFields(template) {
  const plain = template.replaceAll("{{", "").replaceAll("}}", "");
  return [...new Set([...plain.matchAll(/\{([A-Za-z0-9_]+)\}/g)].map((match) => match[1]))];
}

const HAND = "(hand-written)"; // side B's choice of a hand-written prompt instead of a task

const sideSelect = (side, name) => $(`fieldset[data-side=${side}] select[name=${name}]`);

// a side's stored task, as the summary of the version chosen (the latest unless another is)
function chosenTask(side) {
  const task = taskNamed(sideSelect(side, "task").value);
  const version = sideSelect(side, "version").value;
  if (!task || version === "") return task;
  const summary = versionsOf.get(task.task_id)?.find((s) => String(s.version) === version);
  return summary ? { ...summary, pinned: true } : task;
}

// side B as a task-like object: a stored task, a hand-written prompt (run like A's task type), or none
function sideB() {
  if (sideSelect("b", "task").value !== HAND) return chosenTask("b");
  const a = chosenTask("a");
  const template = $("#hand input").value;
  return { task_id: HAND, version: 0, template, handwritten: true,
    task_type: a?.task_type === "classify" ? "classify" : "generate", labels: a?.task_type === "classify" ? a.labels : null };
}

// fill a side's version choice from its task's kept versions (read once per task and list)
async function showVersions(side) {
  const select = sideSelect(side, "version");
  const task = taskNamed(sideSelect(side, "task").value);
  const keep = select.value;
  const latest = [...select.options].filter((option) => option.hasAttribute("data-static"));
  select.closest("label").hidden = !task;
  if (task && (task.versions ?? []).length > 1 && !versionsOf.has(task.task_id)) {
    versionsOf.set(task.task_id, await (await api(`/v1/tasks/${encodeURIComponent(task.task_id)}/versions`)).json());
    if (sideSelect(side, "task").value !== task.task_id) return; // another task was chosen meanwhile: its own call fills this
  }
  const older = task ? (versionsOf.get(task.task_id) ?? []).slice(1) : [];
  select.replaceChildren(...latest, ...older.map((s) => element("option", `${s.version}`, { value: String(s.version) })));
  latest[0].textContent = task ? `latest (${task.version})` : "latest";
  if ([...select.options].some((option) => option.value === keep)) select.value = keep;
  buildFields();
}

async function chooseTask(side) {
  sideSelect(side, "version").value = "";
  showHand();
  try {
    await showVersions(side);
  } catch (error) {
    showError(error);
  }
}

function showHand() {
  const on = sideSelect("b", "task").value === HAND;
  $("#hand").hidden = !on;
  const input = $("#hand input");
  const a = taskNamed(sideSelect("a", "task").value);
  // A's own hand-written start (a prompt trained --from-prompt keeps it): the comparison it was trained for
  if (on && !input.value && a?.metrics?.from_prompt) input.value = a.metrics.from_prompt;
  buildFields();
}

function buildFields() {
  const a = chosenTask("a");
  const chosen = [a, sideB()].filter((task) => task && task.template);
  const names = [...new Set(chosen.flatMap((task) => templateFields(task.template)))];
  const box = $("#fields");
  const before = Object.fromEntries([...box.querySelectorAll("textarea")].map((area) => [area.name, area.value]));
  box.replaceChildren(...names.map((name) => {
    const label = element("label", name);
    const area = element("textarea", null, { name, rows: "2", required: "" });
    area.value = before[name] ?? "";
    label.append(area);
    return label;
  }));
}

function sampling(form) {
  const out = {};
  for (const name of ["max_new_tokens", "top_k", "seed"]) {
    if (form[name].value !== "") out[name] = Number.parseInt(form[name].value, 10);
  }
  for (const name of ["temperature", "top_p"]) {
    if (form[name].value !== "") out[name] = Number.parseFloat(form[name].value);
  }
  const stop = form.stop.value.split("\n").filter((line) => line !== "");
  if (stop.length) out.stop = stop;
  return out;
}

async function run(event) {
  event.preventDefault();
  clearError();
  const form = event.target;
  const inputs = Object.fromEntries([...$("#fields").querySelectorAll("textarea")].map((a) => [a.name, a.value]));
  const sides = [
    { task: chosenTask("a"), out: $("#answer-a") },
    { task: sideB(), out: $("#answer-b") },
  ];
  $("#run").disabled = true;
  try {
    await Promise.all(sides.map(({ task, out }) => task ? answer(task, inputs, sampling(form), out) : out.replaceChildren()));
  } finally {
    $("#run").disabled = false;
  }
}

async function answer(task, allInputs, params, out) {
  const fields = Object.fromEntries(templateFields(task.template).map((name) => [name, allInputs[name] ?? ""]));
  out.replaceChildren(element("h3", task.handwritten ? `hand-written: ${task.template}` : `${task.task_id} (version ${task.version})`));
  out.classList.add("busy");
  try {
    if (task.task_type === "classify") {
      await classify(task, fields, out);
    } else {
      await generate(task, fields, params, out);
    }
  } catch (error) {
    out.append(element("p", describe(error), { class: "failed" }));
  } finally {
    out.classList.remove("busy");
  }
}

// where a task's requests go, and what they add to the body: a hand-written prompt sends its words
function route(task, kind) {
  if (task.handwritten) return [`/v1/handwritten/${kind}`, { template: task.template, ...(task.labels ? { labels: task.labels } : {}) }];
  return [`/v1/tasks/${encodeURIComponent(task.task_id)}/${kind}`, task.pinned ? { version: task.version } : {}];
}

async function classify(task, fields, out) {
  const [path, extra] = route(task, "classify");
  const response = await api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ inputs: fields, ...extra }),
  });
  const result = await response.json();
  out.append(element("p", `label: ${result.label}`, { class: "label" }));
  const bars = element("ul", null, { class: "bars" });
  for (const [label, p] of Object.entries(result.scores).sort((x, y) => y[1] - x[1])) {
    const bar = element("span", null, { class: "bar" });
    bar.style.width = `${(100 * p).toFixed(1)}%`;
    const item = element("li", null, { "data-label": label, "data-score": String(p) });
    item.append(element("span", label, { class: "name" }), bar, element("span", p.toFixed(4), { class: "value" }));
    bars.append(item);
  }
  out.append(bars);
}

async function generate(task, fields, params, out) {
  const [path, extra] = route(task, "generate");
  const response = await api(path, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ inputs: fields, ...params, ...extra, stream: true }),
  });
  const text = element("p", "", { class: "text" });
  const status = element("p", "generating…", { class: "muted status" });
  out.append(text, status);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const line of events) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const event = JSON.parse(line.slice(6));
      if (event.error) throw new ServerError(event.error);
      text.textContent += event.text;
      if (event.done) {
        const n = event.token_ids.length;
        status.textContent = `${n} ${n === 1 ? "token" : "tokens"}, ${event.finish_reason}`;
      }
    }
  }
}

// -- uploading -------------------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  const form = event.target;
  const id = form.task.value.trim();
  const files = [...form.files.files];
  const result = $("#upload-result");
  result.className = "";
  result.textContent = "uploading…";
  try {
    const config = files.find((file) => file.name.endsWith(".json"));
    let response;
    if (config) { // a PEFT adapter: its config and its weights, as multipart
      const weights = files.find((file) => file.name.endsWith(".safetensors"));
      if (!weights || files.length !== 2) throw new Error("a PEFT adapter is two files: adapter_config.json and adapter_model.safetensors");
      const body = new FormData();
      body.append("adapter_config", config);
      body.append("adapter_model", weights);
      response = await api(`/v1/tasks/${encodeURIComponent(id)}/peft`, { method: "PUT", body });
    } else {
      if (files.length !== 1) throw new Error("choose one .safetensors artifact, or a PEFT adapter's two files");
      response = await api(`/v1/tasks/${encodeURIComponent(id)}`, {
        method: "PUT", headers: { "Content-Type": "application/octet-stream" }, body: files[0],
      });
    }
    const summary = await response.json();
    result.textContent = `Stored as version ${summary.version} of task ${summary.task_id}.`;
    await loadTasks();
  } catch (error) {
    result.className = "failed";
    result.textContent = describe(error, "Refused: ");
  }
}

// -- training on the server --------------------------------------------------------

let job = null; // the job this page started and follows

async function uploadFile(file) {
  const body = new FormData();
  body.append("purpose", "fine-tune");
  body.append("file", file);
  return (await (await api("/v1/files", { method: "POST", body })).json()).id;
}

async function startTraining(event) {
  event.preventDefault();
  const form = event.target;
  const status = $("#train-status");
  status.className = "";
  try {
    let labels = null;
    if (form.labels.value.trim()) {
      try {
        labels = JSON.parse(form.labels.value);
      } catch {
        throw new Error("the labels are not JSON: write an object of label → verbalizer");
      }
    }
    status.textContent = "uploading the examples…";
    const models = await (await api("/v1/models")).json();
    const body = {
      model: models.data.find((model) => model.ptserve_base_model).id,
      suffix: form.task.value.trim(),
      training_file: await uploadFile(form.train.files[0]),
      hyperparameters: { n_epochs: Number.parseInt(form.epochs.value, 10), learning_rate_multiplier: Number.parseFloat(form.lr.value) },
    };
    if (form.dev.files.length) body.validation_file = await uploadFile(form.dev.files[0]);
    if (labels) body.labels = labels;
    else body.task_type = "generate";
    if (form.from_prompt.value.trim()) body.from_prompt = form.from_prompt.value;
    job = await (await api("/v1/fine_tuning/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })).json();
    $("#train-start").disabled = true;
    $("#train-cancel").hidden = false;
    followJob();
  } catch (error) {
    status.className = "failed";
    status.textContent = describe(error, "Refused: ");
  }
}

async function followJob() {
  if (!job) return;
  try {
    job = await (await api(`/v1/fine_tuning/jobs/${job.id}`)).json();
    const events = (await (await api(`/v1/fine_tuning/jobs/${job.id}/events?limit=100`)).json()).data;
    $("#train-events").replaceChildren(...events.map((e) => element("li", e.message, { class: e.level })));
    drawTraining(events.filter((e) => e.type === "metrics").map((e) => e.data).reverse());
    const status = $("#train-status");
    status.className = job.status === "failed" ? "failed" : "";
    status.textContent = `job ${job.id}: ${job.status}` + (job.fine_tuned_model ? `, stored as task ${job.fine_tuned_model}` : "")
      + (job.status === "succeeded" && !job.fine_tuned_model ? ", nothing stored (see the last event)" : "")
      + (job.error ? `: ${job.error.message}` : "");
    if (["succeeded", "failed", "cancelled"].includes(job.status)) {
      $("#train-start").disabled = false;
      $("#train-cancel").hidden = true;
      job = null;
      await loadTasks();
      return;
    }
  } catch (error) {
    showError(error);
  }
  setTimeout(followJob, POLL_MS);
}

async function cancelJob() {
  if (!job) return;
  try {
    await api(`/v1/fine_tuning/jobs/${job.id}/cancel`, { method: "POST" });
  } catch (error) {
    showError(error);
  }
}

// per epoch: train loss and dev loss as lines, dev accuracy (classify) in the caption
function drawTraining(epochs) {
  const figure = $("#train-chart");
  figure.hidden = epochs.length === 0;
  if (!epochs.length) return;
  const top = Math.max(...epochs.flatMap((m) => [m.train_loss ?? 0, m.dev_loss ?? 0]), 1e-9);
  const width = Math.max(1, epochs[epochs.length - 1].epoch);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} 40`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "train loss and dev loss per epoch");
  for (const [key, css] of [["train_loss", "train"], ["dev_loss", "dev"]]) {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("class", css);
    line.setAttribute("data-points", String(epochs.filter((m) => m[key] != null).length));
    line.setAttribute("points", epochs.filter((m) => m[key] != null)
      .map((m) => `${m.epoch},${(40 - (38 * m[key]) / top).toFixed(2)}`).join(" "));
    svg.append(line);
  }
  const lastEpoch = epochs[epochs.length - 1];
  const accuracy = "dev_accuracy" in lastEpoch ? `, dev accuracy ${lastEpoch.dev_accuracy.toFixed(3)}` : "";
  $("#train-caption").textContent = `epoch ${lastEpoch.epoch}: train loss ${fmt(lastEpoch.train_loss)} (blue), `
    + `dev loss ${fmt(lastEpoch.dev_loss)} (orange)${accuracy}`;
  figure.querySelector("svg")?.remove();
  figure.append(svg);
}

// -- the server's load, the last five minutes -------------------------------------

const POLL_MS = 2000;
const POINTS = 150;
const series = {
  "tokens/s": [], "running rows": [], "queue": [], "prompt-cache hits %": [], "prefix-cache hits %": [],
};
let last = null;

function rate(now, before) {
  const hits = (now?.hits ?? 0) - (before?.hits ?? 0);
  const misses = (now?.misses ?? 0) - (before?.misses ?? 0);
  return hits + misses > 0 ? (100 * hits) / (hits + misses) : null;
}

async function poll() {
  if (document.hidden) return;
  let stats;
  try {
    stats = await (await api("/v1/stats")).json();
  } catch (error) {
    showError(error);
    return;
  }
  const now = performance.now();
  const tokens = Object.values(stats.batches.generated_tokens ?? {}).reduce((a, b) => a + b, 0);
  if (last) {
    const seconds = (now - last.at) / 1000;
    // a deleted task's count leaves the sum: no rate for that interval rather than a negative one
    push("tokens/s", tokens >= last.tokens ? (tokens - last.tokens) / seconds : null);
    push("running rows", stats.running ?? 0);
    push("queue", stats.queue_depth);
    push("prompt-cache hits %", rate(stats.prompt_cache, last.stats.prompt_cache));
    push("prefix-cache hits %", rate(stats.prefix_cache, last.stats.prefix_cache));
  }
  last = { at: now, tokens, stats };
  const info = stats.server ?? {};
  const rows = [["Model", info.model], ["Device", info.device], ["Precision", info.dtype], ["Engine", stats.engine],
    ["Version", info.version], ["Fine-tuning", stats.fine_tuning?.running ?? `idle (${stats.fine_tuning?.queued ?? 0} queued)`]];
  $("#server-info").replaceChildren(...rows.flatMap(([name, value]) => [element("dt", name), element("dd", value ?? "")]));
  drawCharts();
}

function push(name, value) {
  const points = series[name];
  points.push(value);
  if (points.length > POINTS) points.shift();
}

const SVG = "http://www.w3.org/2000/svg";

function drawCharts() {
  $("#charts").replaceChildren(...Object.entries(series).map(([name, points]) => {
    const known = points.filter((p) => p !== null);
    const top = Math.max(1, ...known);
    const figure = element("figure", null, { class: "chart" });
    const current = known.length ? known[known.length - 1] : null;
    figure.append(element("figcaption", `${name}: ${current === null ? "–" : current.toFixed(1)} (max ${top.toFixed(1)})`));
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${POINTS} 40`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", name);
    const line = document.createElementNS(SVG, "polyline");
    const offset = POINTS - points.length;
    line.setAttribute("points", points.map((p, i) => p === null ? null : `${offset + i},${(40 - (38 * p) / top).toFixed(2)}`)
      .filter(Boolean).join(" "));
    svg.append(line);
    if (current !== null) { // the latest point, so that one point shows too
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", String(POINTS - 1 - (points.length - 1 - points.lastIndexOf(current))));
      dot.setAttribute("cy", (40 - (38 * current) / top).toFixed(2));
      dot.setAttribute("r", "1.5");
      svg.append(dot);
    }
    figure.append(svg);
    return figure;
  }));
}

// -- the page ------------------------------------------------------------------

async function showModel() {
  try {
    const models = await (await api("/v1/models")).json();
    const base = models.data.find((model) => model.ptserve_base_model);
    if (base) $("#model").textContent = `model: ${base.id}`;
  } catch (error) {
    showError(error);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#try-form").addEventListener("submit", run);
  for (const side of ["a", "b"]) {
    sideSelect(side, "task").addEventListener("change", () => chooseTask(side));
    sideSelect(side, "version").addEventListener("change", buildFields);
  }
  $("#hand input").addEventListener("input", buildFields);
  $("#delete-task").addEventListener("click", deleteTask);
  $("#upload-form").addEventListener("submit", upload);
  $("#train-form").addEventListener("submit", startTraining);
  $("#train-cancel").addEventListener("click", cancelJob);
  loadTasks().catch(showError);
  showModel();
  poll();
  setInterval(poll, POLL_MS);
});
