// The search page: /search for the hits, /pairs for their nsfw tag and licence, /image/{key} for their
// thumbnails out of the dataset's tars. The API key, if the service wants one, is asked for once, kept
// for the tab's session and sent as the X-API-Key header, never in a URL: images are fetched with it
// and shown from object URLs.
"use strict";

const KEY_STORAGE = "laion-assets-api-key";
const HIDDEN_BY_SAFE_MODE = new Set(["NSFW", "UNSURE"]);
const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem(KEY_STORAGE);
let lastQuery = null;
let objectUrls = [];

class KeyNeeded extends Error {}

async function detail(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function call(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey) headers["X-API-Key"] = apiKey;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    const reason = await detail(response);
    askForKey(apiKey ? reason : null);
    throw new KeyNeeded(reason);
  }
  if (!response.ok) throw new Error(`${path}: ${await detail(response)}`);
  return response;
}

async function post(path, body) {
  const response = await call(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return response.json();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function askForKey(reason) {
  $("key-section").hidden = false;
  $("search-section").hidden = true;
  $("key-error").textContent = reason || "";
  $("key-error").hidden = !reason;
  $("key-input").focus();
}

async function start() {
  showError("");
  try {
    const info = await (await call("/info")).json();
    $("key-section").hidden = true;
    $("search-section").hidden = false;
    $("change-key").hidden = !apiKey;
    $("dataset").textContent =
      info.search_index_rows != null
        ? `${info.search_index_rows} pairs, ${info.model}`
        : `no search index: ${info.search_index_problem}`;
    $("text-input").focus();
  } catch (error) {
    if (!(error instanceof KeyNeeded)) showError(error.message);
  }
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function search(query, description) {
  lastQuery = [query, description];
  const count = Math.max(1, Math.min(1000, parseInt($("count").value, 10) || 20));
  const safe = $("safe").checked;
  showError("");
  $("status").textContent = `Searching ${description}…`;
  try {
    // Safe mode hides hits here, in the page: ask for more, so that `count` are left.
    const topK = safe ? Math.min(1000, count * 3 + 10) : count;
    const found = await post("/search", { ...query, top_k: topK });
    const details = await post("/pairs", { keys: found.results.map((hit) => hit.key) });
    const byKey = new Map(details.pairs.map((pair) => [pair.key, pair]));
    const hits = found.results.map((hit) => ({ ...hit, ...(byKey.get(hit.key) || {}) }));
    const shown = (safe ? hits.filter((hit) => !HIDDEN_BY_SAFE_MODE.has(hit.nsfw)) : hits).slice(0, count);
    // those safe mode hid from the ranks shown
    const last = shown.length ? hits.indexOf(shown[shown.length - 1]) : hits.length - 1;
    const hidden = safe ? hits.slice(0, last + 1).filter((hit) => HIDDEN_BY_SAFE_MODE.has(hit.nsfw)).length : 0;
    render(shown);
    $("status").textContent =
      `${shown.length} results for ${description} in ${found.time.toFixed(2)} s` +
      (hidden ? ` (${hidden} hidden by safe mode)` : "");
  } catch (error) {
    $("status").textContent = "";
    if (!(error instanceof KeyNeeded)) showError(error.message);
  }
}

function safeHref(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function render(hits) {
  objectUrls.forEach((url) => URL.revokeObjectURL(url));
  objectUrls = [];
  const grid = $("results");
  grid.replaceChildren();
  const template = $("result-template").content;
  for (const hit of hits) {
    const card = template.firstElementChild.cloneNode(true);
    card.dataset.key = hit.key;
    card.dataset.nsfw = hit.nsfw || "";
    card.querySelector(".caption").textContent = hit.caption;
    card.querySelector(".similarity").textContent = hit.similarity.toFixed(3);
    const nsfw = card.querySelector(".nsfw");
    nsfw.textContent = hit.nsfw || "?";
    if (hit.nsfw) nsfw.classList.add(hit.nsfw);
    const license = card.querySelector(".license");
    const licenseHref = hit.license && safeHref(hit.license);
    if (licenseHref) {
      const link = document.createElement("a");
      link.href = licenseHref;
      link.rel = "noopener noreferrer";
      link.target = "_blank";
      link.textContent = hit.license.replace(/^https?:\/\/(www\.)?/, "");
      license.append("licence: ", link);
    } else {
      license.textContent = `licence: ${hit.license || "unknown"}`;
    }
    const source = card.querySelector(".source");
    const href = safeHref(hit.url);
    if (href) source.href = href;
    source.textContent = hit.url;
    card.querySelector(".key").textContent = hit.key;
    const image = card.querySelector("img");
    image.alt = hit.caption;
    const blob = loadImage(image, hit.key);
    blob.catch(() => card.classList.add("no-image"));
    card.querySelector(".similar").addEventListener("click", async () => {
      try {
        const value = await readAsDataUrl(await blob);
        search({ image: { type: "base64", value } }, `images similar to ${hit.key}`);
      } catch (error) {
        if (!(error instanceof KeyNeeded)) showError(error.message);
      }
    });
    grid.append(card);
  }
}

async function loadImage(image, key) {
  const response = await call(`/image/${encodeURIComponent(key)}`);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  objectUrls.push(url);
  image.src = url;
  return blob;
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("key-input").value.trim();
  sessionStorage.setItem(KEY_STORAGE, apiKey);
  $("key-error").hidden = true;
  start();
});

$("change-key").addEventListener("click", () => askForKey(null));

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text-input").value.trim();
  if (text) search({ text }, `“${text}”`);
});

$("image-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("file-input").files[0];
  const url = $("url-input").value.trim();
  try {
    if (file) {
      search({ image: { type: "base64", value: await readAsDataUrl(file) } }, file.name);
    } else if (url) {
      search({ image: { type: "url", value: url } }, url);
    } else {
      showError("choose an image file or give an image URL");
    }
  } catch (error) {
    showError(error.message);
  }
});

$("file-input").addEventListener("change", () => {
  if ($("file-input").files.length) $("image-form").requestSubmit();
});

$("safe").addEventListener("change", () => {
  if (lastQuery) search(...lastQuery);
});

start();
