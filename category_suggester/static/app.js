// The try-a-photo page: uploads photos (or submits a URL), then long-polls the answer the
// service published for each event. Served by category_suggester/web.py; no build step, no library.
"use strict";

const STATE_TEXT = {
  uploading: "Uploading\u2026",
  waiting: "Waiting for the service\u2026",
  suggested: "Suggested",
  dead_lettered: "Refused by the service",
  refused: "Not sent",
  timeout: "No answer",
};

// DLQ and refusal reasons (category_suggester/errors.py, category_suggester/fetch.py, category_suggester/preprocess.py)
// in words a product person reads; the raw reason is shown beside them.
const REASONS = {
  not_an_image: "This file is not an image. Use a JPEG, PNG or WebP photo.",
  format_refused: "This image format is not accepted. Use JPEG, PNG or WebP.",
  image_too_large: "The image has too many pixels to decode safely (a decompression-bomb guard).",
  image_undecodable: "The image is damaged or truncated and cannot be decoded.",
  too_large: "The file is larger than the size limit.",
  address_refused: "The service may not fetch from this address (private or local network).",
  host_refused: "The service may not fetch from this host.",
  scheme_refused: "Only http, https and s3 URLs are accepted.",
  url_invalid: "This is not a valid image URL.",
  too_many_redirects: "The URL redirects too many times.",
  http_status: "The image URL answered with an error.",
  fetch_timeout: "The image URL did not answer in time.",
  fetch_failed: "The image could not be downloaded.",
  event_undecodable: "The service could not read the event.",
  schema_invalid: "The event breaks the event contract.",
  empty: "The file is empty.",
  publish_failed: "Kafka did not take the event.",
};

const STAGES = [
  ["fetch_ms", "fetch"],
  ["preprocess_ms", "decode + resize"],
  ["inference_ms", "inference"],
  ["total_ms", "total"],
];

const results = document.getElementById("results");
const template = document.getElementById("card-template");
let maxBytes = null;

function percent(value) {
  return `${(value * 100).toFixed(1)}%`;
}

function mib(bytes) {
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}

function newCard(name, previewUrl) {
  const card = template.content.firstElementChild.cloneNode(true);
  card.querySelector(".name").textContent = name;
  const img = card.querySelector("img");
  if (previewUrl) {
    img.src = previewUrl;
    img.alt = name;
    img.addEventListener("error", () => card.classList.add("no-image"));
  } else {
    card.classList.add("no-image");
  }
  results.prepend(card);
  setState(card, "uploading");
  return card;
}

function setState(card, state) {
  card.dataset.state = state;
  card.querySelector(".state").textContent = STATE_TEXT[state];
}

function showProblem(card, state, reason, message) {
  setState(card, state);
  card.dataset.reason = reason || "";
  const text = card.querySelector(".message");
  text.textContent = "";
  const plain = document.createElement("strong");
  plain.textContent = REASONS[reason] || "";
  const detail = document.createElement("span");
  detail.className = "detail";
  detail.textContent = reason ? `${reason}: ${message}` : message;
  if (plain.textContent) text.append(plain, " ");
  text.append(detail);
}

function fact(list, term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

function showSuggestion(card, s) {
  setState(card, "suggested");
  card.dataset.category = s.category;
  card.querySelector(".category").textContent = s.category;
  card.querySelector(".score").textContent = percent(s.score);
  const badge = card.querySelector(".badge");
  badge.textContent = s.confident ? "confident" : "not confident";
  badge.classList.add(s.confident ? "confident" : "unsure");
  badge.title = `confident when the top score is at least ${percent(s.confidence_threshold)}`;

  const bars = card.querySelector(".bars");
  for (const entry of s.scores) {
    const item = document.createElement("li");
    item.dataset.category = entry.category;
    item.dataset.score = String(entry.score);
    if (entry.category === s.category) item.classList.add("top");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.category;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = percent(entry.score);
    const mark = document.createElement("span");
    mark.className = "threshold";
    mark.style.left = percent(s.confidence_threshold);
    bar.append(fill, mark);
    const value = document.createElement("span");
    value.className = "pct";
    value.textContent = percent(entry.score);
    item.append(label, bar, value);
    bars.append(item);
  }

  const facts = card.querySelector(".facts");
  fact(facts, "threshold", `${percent(s.confidence_threshold)} (the line on the bars)`);
  fact(
    facts,
    "timings",
    STAGES.map(([key, name]) => `${name} ${Math.round(s.timings[key])} ms`).join(" \u00b7 "),
  );
  fact(facts, "model", `${s.model_name}, version ${s.model_version}`);
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return { error: `http_${response.status}`, message: `the server answered ${response.status}` };
  }
}

async function waitForAnswer(card, accepted) {
  setState(card, "waiting");
  card.dataset.eventId = accepted.event_id;
  const started = Date.now();
  const timer = setInterval(() => {
    const seconds = Math.round((Date.now() - started) / 1000);
    card.querySelector(".state").textContent = `${STATE_TEXT.waiting} ${seconds} s`;
  }, 1000);
  try {
    for (;;) {
      const response = await fetch(`/api/answers/${accepted.event_id}?wait=15`);
      const answer = await readJson(response);
      if (!response.ok) {
        showProblem(card, "timeout", answer.error, answer.message);
        return;
      }
      if (answer.state === "pending") continue;
      if (answer.state === "suggested") {
        showSuggestion(card, answer.suggestion);
      } else if (answer.state === "dead_lettered") {
        const dlq = answer.dead_letter;
        card.dataset.stage = dlq.stage;
        showProblem(card, "dead_lettered", dlq.reason, `${dlq.message} (stage ${dlq.stage})`);
      } else {
        showProblem(card, "timeout", "", answer.message);
      }
      return;
    }
  } catch (error) {
    showProblem(card, "timeout", "", `the page's server does not answer: ${error}`);
  } finally {
    clearInterval(timer);
  }
}

async function submit(card, request) {
  let response;
  try {
    response = await fetch(request.url, request.init);
  } catch (error) {
    showProblem(card, "refused", "", `the page's server does not answer: ${error}`);
    return;
  }
  const body = await readJson(response);
  if (response.status !== 202) {
    showProblem(card, "refused", body.error, body.message);
    return;
  }
  await waitForAnswer(card, body);
}

function uploadFiles(files) {
  for (const file of files) {
    const card = newCard(file.name, URL.createObjectURL(file));
    const form = new FormData();
    form.append("photo", file, file.name);
    submit(card, { url: "/api/photos", init: { method: "POST", body: form } });
  }
}

function submitUrl(url) {
  const card = newCard(url, url);
  submit(card, {
    url: "/api/urls",
    init: {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ url }),
    },
  });
}

async function showStatus() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/api/status");
    const s = await response.json();
    maxBytes = s.max_bytes;
    document.getElementById("limits").textContent =
      `JPEG, PNG or WebP, up to ${mib(maxBytes)} each; several at once`;
    const parts = [
      ["Service", s.service === "ready", { ready: "ready", not_ready: "not ready", down: "not running" }[s.service]],
      ["Triton", s.triton === "ready", { ready: "ready", model_not_ready: "model not ready", down: "not answering" }[s.triton]],
    ];
    status.textContent = "";
    for (const [name, ok, text] of parts) {
      const item = document.createElement("span");
      item.className = ok ? "ok" : "bad";
      item.textContent = `${name}: ${text}`;
      status.append(item);
    }
    const model = document.createElement("span");
    model.textContent = `model ${s.model_name}`;
    status.append(model);
    if (!s.upload_origin_allowed) {
      const warn = document.createElement("span");
      warn.className = "bad";
      warn.textContent =
        `uploads are served from ${s.upload_origin}, which the service may not fetch from: ` +
        "add it to SUGGESTER_FETCH__ALLOWED_HOSTS";
      status.append(warn);
    }
  } catch (error) {
    status.textContent = `The page's server does not answer: ${error}`;
  }
}

function setUp() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  input.addEventListener("change", () => {
    uploadFiles(input.files);
    input.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    uploadFiles(event.dataTransfer.files);
  });
  document.getElementById("url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const field = document.getElementById("url");
    const url = field.value.trim();
    if (url) submitUrl(url);
    field.value = "";
  });
  showStatus();
  setInterval(showStatus, 10000);
}

setUp();
