// The JSON API, called with the key a person typed (kept in this tab's sessionStorage only).

const KEY = "dmae-api-key";

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

/** An error answer: `detail` is the API's own sentence. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function send(path, { method = "GET", json, form } = {}) {
  const headers = {};
  const key = getKey();
  if (key) headers["X-API-Key"] = key;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, `The service did not answer (${err.message}).`);
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const data = await response.json();
      if (data && typeof data.detail === "string") detail = data.detail;
    } catch (_) {
      /* not JSON: keep the status line */
    }
    if (!key && response.status === 401) detail += " (type your API key at the top of the page)";
    throw new ApiError(response.status, detail);
  }
  return response;
}

/** The parsed JSON answer of `path`; throws ApiError with the API's `detail`. */
export async function api(path, options) {
  const response = await send(path, options);
  return response.json();
}

/** An object URL for a binary answer (images need the key header, so no plain `src`). */
export async function apiObjectUrl(path) {
  const response = await send(path);
  return URL.createObjectURL(await response.blob());
}

/** Show `message` (or clear it) in the role="alert" element `el`. */
export function alertIn(el, message) {
  el.textContent = message || "";
}

/** Say `message` to screen readers (the page's polite live region; nothing is shown). */
export function announce(message) {
  const region = document.getElementById("announce");
  region.textContent = ""; // the same words again are a new announcement
  requestAnimationFrame(() => { region.textContent = message; });
}
