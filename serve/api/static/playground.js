// The reelserve playground: the public /v1/videos API from a browser. No framework, no build step.
// Text from the server (prompts, errors) only ever goes into textContent, never into HTML.

const KEY_STORAGE = "reelserve.apiKey";
const FIELDS = ["width", "height", "num_frames", "fps", "num_inference_steps", "guidance_scale", "guidance_scale_2"];
const UNFINISHED = new Set(["queued", "in_progress"]);
const DEFAULT_POLL_MS = 500;
const LIST_REFRESH_MS = 2000;

const $ = (id) => document.getElementById(id);
const state = {
  settings: null,
  watched: null, // id of the job shown in the job panel
  generation: 0, // bumped when the panel changes job: a stale poll sees it and stops
  inflight: Promise.resolve(), // the panel's current poll, awaited before a cancel
  videoUrl: null, // the blob URL of the video shown, revoked when another replaces it
  listTimer: null,
};

// --- talking to the server ---

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

async function call(method, path, body) {
  const headers = {};
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return fetch(path, { method, headers, body, cache: "no-store" });
}

// The message of an error answer: OpenAI's {"error": {...}} on /v1, {"detail": ...} elsewhere.
async function problem(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const error = body.error ?? body;
    message = error.message ?? (typeof error.detail === "string" ? error.detail : JSON.stringify(error.detail));
  } catch {
    // not JSON: the status line says enough
  }
  return response.status === 401 ? `${message} (type the server's API key above)` : message;
}

function notify(message) {
  $("notice").textContent = message;
  $("notice").hidden = !message;
}

// --- the form: bounds and defaults as the server states them ---

async function loadSettings() {
  $("fields").disabled = true;
  let response;
  try {
    response = await call("GET", "/playground/settings");
  } catch {
    notify("Cannot reach the server.");
    return;
  }
  if (!response.ok) {
    notify(await problem(response));
    $("model-line").textContent = "Not connected.";
    return;
  }
  state.settings = await response.json();
  notify("");
  applySettings(state.settings);
  $("fields").disabled = false;
  refreshList();
}

function applySettings(settings) {
  $("model-line").textContent = `Model ${settings.model} (${settings.variant}, ${settings.experts} expert(s))`;
  for (const name of FIELDS) {
    const [low, high] = settings.bounds[name];
    Object.assign($(name), { min: low, max: high, value: settings.defaults[name] });
  }
  Object.assign($("prompt"), { maxLength: settings.max_prompt_chars });
  Object.assign($("negative_prompt"), { maxLength: settings.max_prompt_chars });
  fillSelect($("sampler"), settings.samplers, settings.defaults.sampler);
  fillSelect($("preset"), ["", ...settings.presets], settings.defaults.preset ?? "");
  $("guidance_scale_2-label").hidden = settings.experts < 2;
  $("guidance_scale_2").disabled = settings.experts < 2;
  $("loras-label").hidden = !settings.loras;
  $("image-label").hidden = settings.image_input === "none";
  $("input_reference").required = settings.image_input === "required";
  showDuration();
}

function fillSelect(select, values, chosen) {
  select.replaceChildren(
    ...values.map((value) => new Option(value || "none", value, false, value === chosen)),
  );
}

function showDuration() {
  const frames = Number($("num_frames").value);
  const fps = Number($("fps").value);
  $("duration").textContent = frames && fps ? `${frames} frames at ${fps} fps: ${(frames / fps).toFixed(2)} s` : "";
}

function seedError(text) {
  if (!/^[0-9]*$/.test(text)) return "the seed is a whole number";
  if (text && BigInt(text) > BigInt(state.settings.bounds.seed[1])) return `the seed is at most ${state.settings.bounds.seed[1]}`;
  return "";
}

function parseLoras(text) {
  return text
    .split(",")
    .map((part) => part.trim())
    .filter(Boolean)
    .map((part) => {
      const [name, scale] = part.split(/:(?=[^:]*$)/);
      return scale === undefined ? { name } : { name, scale: Number(scale) };
    });
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function requestJson() {
  const body = { prompt: $("prompt").value };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  for (const name of FIELDS) {
    if (!$(name).disabled) body[name] = Number($(name).value);
  }
  body.sampler = $("sampler").value;
  if ($("preset").value) body.preset = $("preset").value;
  if ($("lossless").checked) body.lossless = true;
  if (state.settings.loras && $("loras").value.trim()) body.loras = parseLoras($("loras").value);
  const image = $("input_reference").files[0];
  if (image) body.input_reference = await readAsDataUrl(image);
  const json = JSON.stringify(body);
  // A JS number is exact only up to 2**53; seeds go up to 2**63 - 1, so write its digits as they are.
  const seed = $("seed").value;
  return seed ? `${json.slice(0, -1)},"seed":${BigInt(seed)}}` : json;
}

async function submit(event) {
  event.preventDefault();
  $("seed").setCustomValidity(seedError($("seed").value));
  if (!$("create-form").reportValidity()) return;
  $("submit").disabled = true;
  try {
    const response = await call("POST", "/v1/videos", await requestJson());
    if (!response.ok) {
      notify(await problem(response));
      return;
    }
    notify("");
    const job = await response.json();
    watch(job.id, job);
    refreshList();
  } catch (error) {
    notify(`The request did not reach the server: ${error.message}`);
  } finally {
    $("submit").disabled = false;
  }
}

// --- the job panel: live progress, cancel, the video ---

function watch(id, job) {
  state.watched = id;
  state.generation += 1;
  showVideo(null);
  $("job-adjusted").textContent = job?.adjustments ? `Adjusted: ${job.adjustments.join("; ")}` : "";
  if (job) renderJob(job);
  state.inflight = poll(id, state.generation);
}

async function poll(id, generation) {
  let response;
  try {
    response = await call("GET", `/v1/videos/${encodeURIComponent(id)}`);
  } catch {
    if (generation === state.generation) setTimeout(() => keepPolling(id, generation), DEFAULT_POLL_MS);
    return;
  }
  if (generation !== state.generation) return;
  if (!response.ok) {
    $("job-error").textContent = await problem(response);
    return;
  }
  const job = await response.json();
  renderJob(job);
  if (UNFINISHED.has(job.status)) {
    const wait = Number(response.headers.get("openai-poll-after-ms")) || DEFAULT_POLL_MS;
    setTimeout(() => keepPolling(id, generation), wait);
  } else {
    refreshList(); // the list shows it ended too
    if (job.status === "completed") await loadVideo(job.id, generation);
  }
}

function keepPolling(id, generation) {
  if (generation === state.generation) state.inflight = poll(id, generation);
}

function renderJob(job) {
  $("job-empty").hidden = true;
  $("job-view").hidden = false;
  $("job-id").textContent = job.id;
  $("job-status").textContent = job.status;
  $("job-status").dataset.status = job.status;
  $("job-prompt").textContent = `${job.prompt} (${job.size}, ${job.seconds} s)`;
  $("job-progress").value = job.progress;
  $("job-percent").textContent = `${job.progress} %`;
  const queued = job.status === "queued" && job.queue_position != null;
  $("job-queue").textContent = queued ? `Queue position ${job.queue_position + 1} (${job.queue_position} ahead)` : "";
  const eta = UNFINISHED.has(job.status) && job.eta_seconds != null;
  $("job-eta").textContent = eta ? `About ${job.eta_seconds.toFixed(1)} s of denoising left` : "";
  $("job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("cancel").hidden = !UNFINISHED.has(job.status);
}

async function loadVideo(id, generation) {
  let response;
  try {
    response = await call("GET", `/v1/videos/${encodeURIComponent(id)}/content`);
  } catch (error) {
    // Also what a server with --presigned-urls gives: its redirect leads to another origin (CSP).
    $("job-error").textContent = `The video could not be fetched here: ${error.message}`;
    return;
  }
  if (generation !== state.generation) return;
  if (!response.ok) {
    $("job-error").textContent = await problem(response);
    return;
  }
  const blob = await response.blob();
  if (generation === state.generation) showVideo(URL.createObjectURL(blob), id);
}

function showVideo(url, id) {
  if (state.videoUrl) URL.revokeObjectURL(state.videoUrl);
  state.videoUrl = url;
  $("player").hidden = !url;
  $("download").hidden = !url;
  if (url) {
    $("player").src = url;
    Object.assign($("download"), { href: url, download: `${id}.mp4` });
  } else {
    $("player").removeAttribute("src");
    $("download").removeAttribute("href");
  }
}

// DELETE is the API's cancel: the job stops at its next step and its record goes.
async function cancelWatched() {
  const id = state.watched;
  state.generation += 1; // stop polling first, and let a poll on its way finish (no 404 from it)
  await state.inflight;
  $("cancel").disabled = true;
  try {
    const response = await call("DELETE", `/v1/videos/${encodeURIComponent(id)}`);
    if (!response.ok) {
      $("job-error").textContent = await problem(response);
      return;
    }
    $("job-status").textContent = "cancelled";
    $("job-status").dataset.status = "cancelled";
    $("job-queue").textContent = "";
    $("job-eta").textContent = "";
    $("cancel").hidden = true;
  } finally {
    $("cancel").disabled = false;
    refreshList();
  }
}

// --- the caller's recent jobs ---

async function refreshList() {
  clearTimeout(state.listTimer);
  let response;
  try {
    response = await call("GET", "/v1/videos?limit=20&order=desc");
  } catch {
    return;
  }
  if (!response.ok) {
    notify(await problem(response));
    return;
  }
  const jobs = (await response.json()).data;
  $("jobs-body").replaceChildren(...jobs.map(jobRow));
  $("jobs-empty").hidden = jobs.length > 0;
  if (jobs.some((job) => UNFINISHED.has(job.status))) state.listTimer = setTimeout(refreshList, LIST_REFRESH_MS);
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.id = job.id;
  const created = new Date(job.created_at * 1000).toLocaleTimeString();
  const status = UNFINISHED.has(job.status) ? `${job.status} ${job.progress} %` : job.status;
  for (const text of [created, job.prompt, job.size, job.seconds, status]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  const actions = document.createElement("td");
  actions.append(button("Open", "open"), button(UNFINISHED.has(job.status) ? "Cancel" : "Delete", "delete"));
  row.append(actions);
  return row;
}

function button(text, action) {
  const element = document.createElement("button");
  Object.assign(element, { type: "button", textContent: text });
  element.dataset.action = action;
  return element;
}

async function onListClick(event) {
  const action = event.target.dataset?.action;
  const id = event.target.closest("tr")?.dataset.id;
  if (!action || !id) return;
  if (action === "open") {
    watch(id);
  } else if (id === state.watched) {
    await cancelWatched();
  } else {
    const response = await call("DELETE", `/v1/videos/${encodeURIComponent(id)}`);
    if (!response.ok) notify(await problem(response));
    refreshList();
  }
}

// --- the API key: kept for this tab only (sessionStorage), sent as a bearer token ---

function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  $("api-key").placeholder = key ? "key set for this tab" : "only if the server has --api-key";
  loadSettings();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").placeholder = "only if the server has --api-key";
  loadSettings();
}

function start() {
  if (apiKey()) $("api-key").placeholder = "key set for this tab";
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("create-form").addEventListener("submit", submit);
  $("num_frames").addEventListener("input", showDuration);
  $("fps").addEventListener("input", showDuration);
  $("seed").addEventListener("input", () => $("seed").setCustomValidity(""));
  $("cancel").addEventListener("click", cancelWatched);
  $("refresh").addEventListener("click", refreshList);
  $("jobs-body").addEventListener("click", onListClick);
  loadSettings();
}

start();
