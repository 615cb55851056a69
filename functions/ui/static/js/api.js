// The control plane's /v1 API, with the signed-in key as a Bearer token (kept in sessionStorage: this tab only).

const KEY = "paddlefn.key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const getKey = () => sessionStorage.getItem(KEY);
export const setKey = (key) => sessionStorage.setItem(KEY, key);
export const clearKey = () => sessionStorage.removeItem(KEY);

function headers(extra = {}) {
  const key = getKey();
  return key ? { authorization: `Bearer ${key}`, ...extra } : extra;
}

async function errorOf(response) {
  let message = response.statusText;
  try {
    message = (await response.json()).error || message;
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, message);
}

export async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers(body ? { "content-type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "cannot reach the platform; is it running?");
  }
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

export async function text(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await errorOf(response);
  return response.text();
}

// multipart upload with progress (fetch cannot report upload progress; XMLHttpRequest can)
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    const key = getKey();
    if (key) xhr.setRequestHeader("authorization", `Bearer ${key}`);
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : 0);
    xhr.onload = () => {
      let data = null;
      try {
        data = JSON.parse(xhr.responseText);
      } catch {
        // leave null
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, (data && data.error) || xhr.statusText || "upload failed"));
    };
    xhr.onerror = () => reject(new ApiError(0, "the upload was interrupted; check the connection and retry"));
    xhr.send(form);
  });
}
