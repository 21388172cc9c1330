// The dimba live page: builds the sampler controls of the served model's family (GET /v1/models), streams a
// completion's denoising steps (POST /v1/completions with "stream": true, server-sent events) and redraws the
// canvas at every step: masks, tokens committed at this step, earlier ones coloured by confidence. Every frame
// is kept, so the replay slider scrubs through the steps once the text is done.
"use strict";

const $ = (id) => document.getElementById(id);
const KIND_CLASS = { m: "mask", n: "new", d: "done", e: "est" };
let model = null;
let frames = [];
let controller = null;
let promptText = "";

function setState(state) {
  document.body.dataset.state = state;
  $("start").disabled = state === "running" || model === null;
  $("stop").disabled = state !== "running";
  $("replay").disabled = state === "running" || frames.length < 2;
}

function confidenceColour(c) {
  return c === null ? "" : `hsl(${Math.round(120 * Math.max(0, Math.min(1, c)))}, 75%, 82%)`;
}

function control(name, spec) {
  const label = document.createElement("label");
  label.title = spec.description || "";
  let input;
  if (spec.enum) {
    input = document.createElement("select");
    for (const option of spec.enum) input.add(new Option(option, option));
  } else {
    input = document.createElement("input");
    input.type = "number";
    input.step = spec.type === "integer" ? "1" : "any";
    const low = spec.minimum ?? spec.exclusiveMinimum;
    if (low !== undefined) input.min = low;
    if (spec.maximum !== undefined) input.max = spec.maximum;
    if (spec.nullable) input.placeholder = "none";
  }
  input.id = `s-${name}`;
  input.dataset.name = name;
  input.dataset.type = spec.type || "string";
  input.value = spec.default ?? "";
  label.append(`${name} `, input);
  return label;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    model = (await response.json()).data[0];
  } catch (err) {
    $("model").textContent = `could not read /v1/models: ${err}`;
    setState("error");
    return;
  }
  const d = model.dimba;
  $("model").textContent = `${model.id} · ${d.family} family · ${(d.parameters / 1e6).toFixed(2)}M parameters · ` +
    `context ${d.context_length} tokens`;
  $("sampler").replaceChildren(...Object.entries(d.sampler).map(([name, spec]) => control(name, spec)));
  $("max_tokens").max = d.limits.max_tokens;
  $("max_tokens").value = Math.max(1, Math.min(64, Math.floor(d.limits.max_tokens / 2))); // room for a prompt
  setState("idle");
}

function requestBody() {
  const body = { prompt: $("prompt").value, max_tokens: parseInt($("max_tokens").value, 10), stream: true };
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  for (const input of $("sampler").querySelectorAll("[data-name]")) {
    if (input.value === "") continue;
    const type = input.dataset.type;
    body[input.dataset.name] = type === "integer" ? parseInt(input.value, 10)
      : type === "number" ? parseFloat(input.value) : input.value;
  }
  return body;
}

function rowElement(row) {
  const div = document.createElement("div");
  div.className = "row";
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = promptText;
  div.append(prompt);
  for (let i = 0; i < row.tokens.length; i++) {
    const kind = row.kinds[i];
    if (kind === "x") break; // the end of the text
    const span = document.createElement("span");
    span.className = `tok ${KIND_CLASS[kind]}`;
    span.textContent = kind === "m" ? "▒" : row.tokens[i];
    const c = row.confidence[i];
    if (kind !== "m") span.style.background = confidenceColour(c);
    if (c !== null) span.title = `confidence ${c}`;
    div.append(span);
  }
  return div;
}

function draw(k) {
  const frame = frames[k];
  $("canvas").replaceChildren(...frame.canvas.map(rowElement));
  $("step").textContent = `step ${frame.step}/${frame.numSteps}${frame.final ? " · final" : ""}`;
  $("elapsed").textContent = `${frame.elapsed.toFixed(2)} s`;
  $("replay").value = k;
}

function showError(message) {
  $("error").textContent = message;
  setState("error");
}

function onEvent(data) {
  if (data === "[DONE]") return;
  const msg = JSON.parse(data);
  if (msg.error) return showError(msg.error.message);
  const d = msg.dimba;
  if (!msg.usage) {
    frames.push({ step: d.step, numSteps: d.num_steps, canvas: d.canvas, elapsed: d.elapsed_s });
    $("replay").max = frames.length - 1;
    draw(frames.length - 1);
    return;
  }
  const last = frames.length ? frames[frames.length - 1] : { step: d.steps, numSteps: d.steps };
  frames.push({ step: last.step, numSteps: last.numSteps, canvas: d.canvas, final: true, elapsed: d.latency_s });
  $("replay").max = frames.length - 1;
  draw(frames.length - 1);
  $("final").textContent = msg.choices.map((c) => promptText + c.text).join("\n\n");
  $("latency").textContent = `latency ${d.latency_s.toFixed(2)} s`;
  $("rate").textContent = `${d.tokens_per_s.toFixed(1)} tokens/s`;
  setState("done");
}

async function readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) onEvent(data);
    }
  }
}

async function start(event) {
  event.preventDefault();
  frames = [];
  promptText = $("prompt").value;
  for (const id of ["final", "error", "latency", "rate", "elapsed"]) $(id).textContent = "";
  $("canvas").replaceChildren();
  controller = new AbortController();
  setState("running");
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) return showError((await response.json()).error.message);
    await readEvents(response);
    if (document.body.dataset.state === "running") showError("the stream ended before the text was done");
  } catch (err) {
    if (err.name === "AbortError") setState("stopped");
    else showError(String(err));
  }
}

$("form").addEventListener("submit", start);
$("stop").addEventListener("click", () => controller && controller.abort());
$("replay").addEventListener("input", (e) => draw(parseInt(e.target.value, 10)));
loadModel();
