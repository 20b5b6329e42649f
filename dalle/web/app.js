// The page of `dalle serve`: submit a job, poll it, show the ranked images.
// Plain JavaScript, no build step.  The server validates every field and its
// messages are shown as they come (the form is `novalidate` on purpose).
"use strict";

const $ = (selector) => document.querySelector(selector);
const POLL_MS = 300;

let info = null;            // GET /api/info
let completionImage = null; // Blob to complete: the chosen file or a result
let previewImage = null;    // the same, decoded for the preview canvas
let busy = false;

// --- messages and status -------------------------------------------------------

function showError(text) {
  const box = $("#message");
  box.textContent = text;
  box.hidden = false;
}

function clearError() {
  $("#message").hidden = true;
  $("#message").textContent = "";
}

function setStatus(text, progress) {
  $("#status").hidden = text === null;
  $("#status-text").textContent = text || "";
  const bar = $("#progress");
  if (progress === null || progress === undefined) bar.removeAttribute("value"); // indeterminate
  else bar.value = progress;
}

function setBusy(value) {
  busy = value;
  for (const button of document.querySelectorAll("button.go")) button.disabled = value;
}

// --- tabs ----------------------------------------------------------------------

function selectTab(name) {
  for (const tab of ["generate", "complete"]) {
    $(`#tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`#panel-${tab}`).hidden = tab !== name;
  }
}

// --- the model's facts ---------------------------------------------------------

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    info = await response.json();
  } catch (err) {
    $("#model-info").textContent = "cannot reach the server: is `dalle serve` still running?";
    return;
  }
  const g = info.grid;
  $("#model-info").textContent =
    `${info.image_size}×${info.image_size} px images from a ${g}×${g} token grid` +
    ` · ${info.reranker ? "ranked by CLIP" : "no CLIP reranker: sampling order"}` +
    (info.device ? ` · ${info.device}` : "");
  $("#candidates").max = info.limits.max_candidates;
  $("#temperature").max = info.limits.max_temperature;
  $("#guidance").max = info.limits.max_guidance;
  if (!info.guidance) {  // a model trained without null captions cannot be guided
    $("#guidance").value = 1;
    $("#guidance").disabled = true;
    $("#guidance").title = "this model was trained without null captions, so it cannot be guided";
  }
  if (info.image_vocab) $("#top-k").max = info.image_vocab;
  for (const id of ["#keep-rows", "#region-row", "#region-col"]) {
    $(id).max = g - 1;
    $(id).value = Math.floor(g / 2);
  }
  drawPreview();
}

// --- submitting and polling ----------------------------------------------------

function samplingFields() {
  return {
    candidates: $("#candidates").value,
    keep: $("#keep").value,
    temperature: $("#temperature").value,
    top_k: $("#top-k").value,
    guidance: $("#guidance").value,
    seed: $("#seed").value,
  };
}

async function post(url, options) {
  let response;
  try {
    response = await fetch(url, { method: "POST", ...options });
  } catch (err) {
    throw new Error("cannot reach the server: is `dalle serve` still running?");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status} ${response.statusText}`);
  return data;
}

async function submitGenerate(event) {
  event.preventDefault();
  const body = { prompt: $("#gen-prompt").value, ...samplingFields() };
  await run(() => post("/api/generate", {
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  }));
}

async function submitComplete(event) {
  event.preventDefault();
  if (!completionImage) {
    showError("choose an image file to complete (PNG or JPEG)");
    return;
  }
  if (info && completionImage.size > info.limits.max_upload_bytes) {
    const mb = (n) => (n / 2 ** 20).toFixed(1);
    showError(`the image file is ${mb(completionImage.size)} MB; the limit is ${mb(info.limits.max_upload_bytes)} MB`);
    return;
  }
  const form = new FormData();
  form.append("image", completionImage, completionImage.name || "image.png");
  form.append("prompt", $("#complete-prompt").value);
  form.append("mode", document.querySelector('input[name="mode"]:checked').value);
  form.append("keep_rows", $("#keep-rows").value);
  form.append("row", $("#region-row").value);
  form.append("col", $("#region-col").value);
  for (const [name, value] of Object.entries(samplingFields())) form.append(name, value);
  await run(() => post("/api/complete", { body: form }));
}

async function run(submit) {
  if (busy) return;
  clearError();
  setBusy(true);
  try {
    let job = await submit();
    setStatus(describe(job), 0);
    while (job.state === "queued" || job.state === "running") {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      const response = await fetch(`/api/jobs/${job.id}`).catch(() => null);
      if (!response) throw new Error("lost the server while waiting: is `dalle serve` still running?");
      const data = await response.json();
      if (!response.ok) throw new Error(data.error);
      job = data;
      setStatus(describe(job), job.state === "queued" ? 0 : job.progress);
    }
    if (job.state === "error") throw new Error(job.error);
    setStatus(`${job.results.length} image(s) in ${job.elapsed.toFixed(1)} s · seed ${job.seed}`, 1);
    showResults(job);
    if (job.warning) showError(`note: ${job.warning}`);
  } catch (err) {
    setStatus(null);
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

function describe(job) {
  if (job.state === "queued") {
    return job.ahead > 0 ? `waiting in the queue: ${job.ahead} job(s) ahead of yours` : "next in line…";
  }
  if (job.state === "running") {
    const n = job.params.candidates;
    const done = job.progress === null ? "" : ` ${Math.round(job.progress * 100)}%`;
    return `sampling ${n} candidate(s)…${done}`;
  }
  return job.state;
}

function showResults(job) {
  const gallery = $("#gallery");
  gallery.replaceChildren();
  const caption = document.createElement("p");
  caption.className = "prompt";
  caption.textContent = `${job.kind === "complete" ? "completed" : "generated"}: “${job.prompt}”`;
  gallery.append(caption);
  for (const result of job.results) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = result.url;
    img.alt = `rank ${result.rank + 1} for “${job.prompt}”`;
    const label = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${result.rank + 1} · CLIP ${result.score.toFixed(3)}`;
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "complete";
    reuse.title = "complete this image in the completion tab";
    reuse.addEventListener("click", () => useForCompletion(result.url));
    label.append(score, reuse);
    figure.append(img, label);
    gallery.append(figure);
  }
}

// --- completion input and its preview -----------------------------------------

async function setCompletionImage(blob) {
  completionImage = blob;
  previewImage = null;
  $("#preview-note").textContent = "Shaded tokens are regenerated; click the image to move where that starts.";
  try {
    previewImage = await createImageBitmap(blob);
  } catch (err) {
    // The server has the last word (it may read formats the browser cannot); say what we know.
    $("#preview-note").textContent = "The browser cannot show this file as an image.";
  }
  drawPreview();
}

async function useForCompletion(url) {
  const blob = await (await fetch(url)).blob();
  $("#complete-file").value = "";
  selectTab("complete");
  if (!$("#complete-prompt").value) $("#complete-prompt").value = $("#gen-prompt").value;
  await setCompletionImage(new File([blob], "result.png", { type: "image/png" }));
}

function regenerated(r, c) {
  const mode = document.querySelector('input[name="mode"]:checked').value;
  if (mode === "rows") return r >= Number($("#keep-rows").value);
  return r >= Number($("#region-row").value) && c >= Number($("#region-col").value);
}

function drawPreview() {
  const canvas = $("#complete-preview");
  const ctx = canvas.getContext("2d");
  const size = canvas.width;
  ctx.clearRect(0, 0, size, size);
  if (previewImage) {
    // Centre-crop to a square, as the server does.
    const side = Math.min(previewImage.width, previewImage.height);
    const sx = (previewImage.width - side) / 2;
    const sy = (previewImage.height - side) / 2;
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(previewImage, sx, sy, side, side, 0, 0, size, size);
  }
  const g = info ? info.grid : 8;
  const cell = size / g;
  ctx.fillStyle = "rgba(47, 91, 211, 0.45)";
  for (let r = 0; r < g; r++) {
    for (let c = 0; c < g; c++) {
      if (regenerated(r, c)) ctx.fillRect(c * cell, r * cell, cell, cell);
    }
  }
  ctx.strokeStyle = "rgba(255, 255, 255, 0.5)";
  ctx.lineWidth = 1;
  for (let i = 1; i < g; i++) {
    ctx.beginPath(); ctx.moveTo(i * cell, 0); ctx.lineTo(i * cell, size); ctx.stroke();
    ctx.beginPath(); ctx.moveTo(0, i * cell); ctx.lineTo(size, i * cell); ctx.stroke();
  }
}

function clickPreview(event) {
  const canvas = $("#complete-preview");
  const box = canvas.getBoundingClientRect();
  const g = info ? info.grid : 8;
  const r = Math.min(g - 1, Math.floor(((event.clientY - box.top) / box.height) * g));
  const c = Math.min(g - 1, Math.floor(((event.clientX - box.left) / box.width) * g));
  const mode = document.querySelector('input[name="mode"]:checked').value;
  if (mode === "rows") {
    $("#keep-rows").value = r;
  } else {
    $("#region-row").value = r;
    $("#region-col").value = c;
  }
  drawPreview();
}

// --- wiring --------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#tab-generate").addEventListener("click", () => selectTab("generate"));
  $("#tab-complete").addEventListener("click", () => selectTab("complete"));
  $("#panel-generate").addEventListener("submit", submitGenerate);
  $("#panel-complete").addEventListener("submit", submitComplete);
  $("#complete-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) setCompletionImage(file);
  });
  $("#complete-preview").addEventListener("click", clickPreview);
  for (const input of document.querySelectorAll('#panel-complete input[name="mode"], #panel-complete input[type="number"]')) {
    input.addEventListener("input", drawPreview);
  }
  $("#seed-random").addEventListener("click", () => {
    $("#seed").value = Math.floor(Math.random() * 2 ** 31);
  });
  // Enter submits; Shift+Enter makes a new line.
  for (const id of ["#gen-prompt", "#complete-prompt"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        event.target.form.requestSubmit();
      }
    });
  }
  loadInfo();
});
