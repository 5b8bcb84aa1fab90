// The service page (GET /): send an image to /predict (and /search with an index), draw bars and thumbnails.
// Behind an API key the page asks for it once and keeps it in sessionStorage: this tab remembers it across reloads,
// other sites and closed tabs never see it. It goes in a header (never a cookie), so another site's page cannot
// make this browser send it.
"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "headstart-api-key";
let hasIndex = false;
let thumbURLs = [];

function element(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;  // textContent: file names and labels are never parsed as HTML
  return e;
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { "X-API-Key": key } : {};
}

class KeyRefused extends Error {}

async function request(url, options = {}) {
  const response = await fetch(url, { ...options, headers: authHeaders() });
  if (response.status === 401) {
    const stored = sessionStorage.getItem(KEY) !== null;
    sessionStorage.removeItem(KEY);
    askForKey(stored ? "The service refused that key; enter it again." : "");
    throw new KeyRefused("this service needs an API key");
  }
  return response;
}

async function call(url, file) {
  const body = new FormData();
  body.append("files", file, file.name);
  const response = await request(url, { method: "POST", body });
  const data = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  return data.results[0];
}

function showBars(result) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const item of result.top) {
    const row = element("div", "row");
    row.append(element("span", "bar-label", item.label));
    const track = element("div", "bar-track"), fill = element("div", "bar-fill");
    fill.style.width = (100 * item.probability).toFixed(1) + "%";
    track.append(fill);
    row.append(track, element("span", "bar-value", (100 * item.probability).toFixed(1) + "%"));
    bars.append(row);
  }
}

async function thumbnail(url) {
  // Fetched, not set as img.src: an <img> request cannot carry the key's header.
  const response = await request(url);
  if (!response.ok) return "";
  const blob = URL.createObjectURL(await response.blob());
  thumbURLs.push(blob);
  return blob;
}

async function showThumbs(result) {
  const thumbs = $("thumbs");
  thumbURLs.forEach((u) => URL.revokeObjectURL(u));
  thumbURLs = [];
  const sources = await Promise.all(result.neighbours.map((n) => thumbnail(n.thumb)));
  thumbs.replaceChildren();
  result.neighbours.forEach((n, i) => {
    const fig = element("figure"), img = element("img");
    img.src = sources[i];
    img.alt = n.name;
    fig.append(img, element("figcaption", "", n.label + " · " + n.score.toFixed(3)));
    thumbs.append(fig);
  });
  $("similar").hidden = false;
}

async function handle(file) {
  if (!file) return;
  $("error").textContent = "";
  $("bars").replaceChildren();
  $("thumbs").replaceChildren();
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.style.display = "block";
  try {
    showBars(await call("predict?top_k=5", file));
    if (hasIndex) await showThumbs(await call("search?k=8", file));
  } catch (error) {
    if (!(error instanceof KeyRefused)) $("error").textContent = error.message;
  }
}

function askForKey(message) {
  $("model").textContent = "this service needs an API key";
  $("error").textContent = message;
  $("auth").hidden = false;
  $("key").focus();
}

async function start() {
  try {
    const h = await (await request("health")).json();
    if (h.classes === undefined) return askForKey("");  // a bare liveness answer: the service wants a key
    $("auth").hidden = true;
    $("error").textContent = "";
    hasIndex = h.index;
    $("model").textContent = h.backbone + " · classes: " + h.classes.join(", ") +
      (h.index ? " · index of " + h.index_size + " images" : "");
  } catch (error) {
    if (!(error instanceof KeyRefused)) $("error").textContent = error.message;
  }
}

$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  start();
});

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  handle(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => handle(e.target.files[0]));

start();
