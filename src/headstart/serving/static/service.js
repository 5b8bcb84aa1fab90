// The service page (GET /): send an image to /predict (and /search with an index), draw bars and thumbnails.
"use strict";
const $ = (id) => document.getElementById(id);
let hasIndex = false;

function element(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;  // textContent: file names and labels are never parsed as HTML
  return e;
}

async function call(url, file) {
  const body = new FormData();
  body.append("files", file, file.name);
  const response = await fetch(url, { method: "POST", body });
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

function showThumbs(result) {
  const thumbs = $("thumbs");
  thumbs.replaceChildren();
  for (const n of result.neighbours) {
    const fig = element("figure"), img = element("img");
    img.src = n.thumb;
    img.alt = n.name;
    fig.append(img, element("figcaption", "", n.label + " · " + n.score.toFixed(3)));
    thumbs.append(fig);
  }
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
    if (hasIndex) showThumbs(await call("search?k=8", file));
  } catch (error) {
    $("error").textContent = error.message;
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  handle(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => handle(e.target.files[0]));

fetch("health").then((r) => r.json()).then((h) => {
  hasIndex = h.index;
  $("model").textContent = h.backbone + " · classes: " + h.classes.join(", ") +
    (h.index ? " · index of " + h.index_size + " images" : "");
});
