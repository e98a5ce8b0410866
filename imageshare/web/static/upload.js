// A small tus 1.0 client (core, creation, creation-with-upload) for the upload page: files and folders (dropped or
// chosen), per-file and overall progress, chunks of data-chunk bytes, and resumption after a
// dropped connection (HEAD for the offset, then PATCH from there; retried with back-off, also
// after a reload of the page, from the upload URLs remembered in localStorage). A connection
// that stalls without failing (a network cut the browser does not notice) is given up after
// STALL_MS without progress and resumed; coming back online retries at once.
(function () {
  "use strict";
  const drop = document.getElementById("drop");
  if (!drop) return;
  const base = drop.dataset.base;
  const chunkSize = parseInt(drop.dataset.chunk, 10) || 8 * 1024 * 1024;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const list = document.getElementById("files");
  const overall = document.getElementById("overall");
  const overallText = document.getElementById("overall-text");
  const sendButton = document.getElementById("send");
  const storeKey = "imageshare-upload-" + drop.dataset.key;
  const queue = [];
  const items = [];
  let running = 0;
  const PARALLEL = 6; // files at once: the connections a browser opens to one host
  const STALL_MS = 60000; // no byte moved for this long: the connection is taken as lost
  // files that arrived before this page was loaded (listed by the server) may be sent too
  const arrivedBefore = list.querySelectorAll("li.done").length;
  let wake = [];  // retries waiting for their back-off, woken when the browser is online

  function b64(text) {
    return btoa(unescape(encodeURIComponent(text)));
  }

  function remembered() {
    try { return JSON.parse(localStorage.getItem(storeKey) || "{}"); } catch (e) { return {}; }
  }

  function remember(fingerprint, url) {
    const all = remembered();
    if (url) { all[fingerprint] = url; } else { delete all[fingerprint]; }
    try { localStorage.setItem(storeKey, JSON.stringify(all)); } catch (e) { /* private mode */ }
  }

  // "12 of 30 KB", "1.5 of 250.0 MB": both numbers in the unit that suits the total, so a
  // small file (a photo, a letter) does not read "0.0 of 0.0 MB".
  function amount(sent, total) {
    const units = [["GB", 1073741824, 2], ["MB", 1048576, 1], ["KB", 1024, 0]];
    for (const [unit, size, places] of units) {
      if (total >= size) {
        const show = (n) => (n / size).toFixed(places);
        let part = show(sent);
        if (sent < total && part === show(total)) part = show(total - size / 10 ** places);
        return `${part} of ${show(total)} ${unit}`;
      }
    }
    return `${sent} of ${total} bytes`;
  }

  function updateOverall() {
    let total = 0, sent = 0, done = 0, failed = 0;
    for (const item of items) {
      total += item.file.size; sent += Math.max(item.sent, item.moving || 0);
      if (item.state === "done") done += 1;
      if (item.state === "failed") failed += 1;
    }
    overall.max = Math.max(total, 1);
    overall.value = sent;
    // Files that arrived before the page was loaded (after a reload, or a refused Send)
    // are counted too: the line never says "No files yet" above files listed as arrived.
    const before = arrivedBefore ? `${arrivedBefore} file(s) arrived before` : "";
    overallText.textContent = items.length
      ? `${done} of ${items.length} file(s) arrived (${amount(sent, total)})` +
        (failed ? `, ${failed} could not be sent` : "") + (before ? `; ${before}` : "")
      : (before ? `${before}, ready to send` : "No files yet");
    const busy = items.some((i) => i.state !== "done" && i.state !== "failed");
    sendButton.disabled = busy || done + arrivedBefore === 0;
  }

  // The overall line counts every file: with a CD's thousand files it is redrawn at most
  // ten times a second, not once per change of every file.
  let overallDue = null;
  function scheduleOverall() {
    if (overallDue === null) {
      overallDue = setTimeout(() => { overallDue = null; updateOverall(); }, 100);
    }
  }

  function show(item, state, text) {
    item.state = state;
    if (item.row.className !== state) item.row.className = state;
    if (item.status.textContent !== text) item.status.textContent = text;
    item.bar.max = Math.max(item.file.size, 1);
    item.bar.value = item.sent;
    scheduleOverall();
  }

  function add(file, path) {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = path;
    const bar = document.createElement("progress");
    bar.setAttribute("aria-label", path);  // a screen reader says whose progress it is
    const status = document.createElement("span");
    status.className = "state";
    row.append(name, " ", bar, " ", status);
    list.append(row);
    const item = { file, path, row, bar, status, sent: 0, state: "waiting", url: null,
                   fingerprint: [path, file.size, file.lastModified].join("|"), tries: 0,
                   restarts: 0 };
    items.push(item);
    show(item, "waiting", "waiting");
    queue.push(item);
    pump();
  }

  function pump() {
    while (running < PARALLEL && queue.length) {
      const item = queue.shift();
      running += 1;
      upload(item).finally(() => { running -= 1; pump(); });
    }
  }

  function request(method, url, headers, body, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      let stalled = null;
      const watch = () => {  // given up when nothing moves for STALL_MS (see above)
        clearTimeout(stalled);
        stalled = setTimeout(() => xhr.abort(), STALL_MS);
      };
      const end = (fn) => () => { clearTimeout(stalled); fn(); };
      xhr.open(method, url);
      xhr.setRequestHeader("Tus-Resumable", "1.0.0");
      xhr.setRequestHeader("X-CSRF-Token", csrf);
      for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
      xhr.upload.onprogress = (e) => { watch(); if (onProgress) onProgress(e.loaded); };
      xhr.onprogress = watch;
      xhr.onload = end(() => resolve(xhr));
      xhr.onerror = end(() => reject(new Error("network")));
      xhr.onabort = end(() => reject(new Error("network")));
      xhr.ontimeout = end(() => reject(new Error("network")));
      watch();
      xhr.send(body);
    });
  }

  // The server's answer, as a number of bytes received (NaN: not one; the caller asks again)
  function offsetOf(xhr) {
    const text = xhr.getResponseHeader("Upload-Offset") || "";
    return /^[0-9]+$/.test(text) ? parseInt(text, 10) : NaN;
  }

  class Refused extends Error {}  // the server cannot take it now (507): try again later

  function problem(xhr) {
    try { return JSON.parse(xhr.responseText).detail || xhr.statusText; } catch (e) {
      return xhr.statusText || "refused";
    }
  }

  // Waits ``ms``, or less when the browser comes back online.
  const sleep = (ms) => new Promise((r) => {
    const done = () => { clearTimeout(timer); wake = wake.filter((w) => w !== done); r(); };
    const timer = setTimeout(done, ms);
    wake.push(done);
  });
  window.addEventListener("online", () => { for (const w of [...wake]) w(); });

  async function upload(item) {
    item.url = remembered()[item.fingerprint] || null;
    attempt: for (;;) {
      try {
        if (!item.url) {
          // tus creation-with-upload: the first chunk (all of a small file) goes with it
          const first = item.file.slice(0, Math.min(chunkSize, item.file.size));
          show(item, "sending", "sending");
          const created = await request("POST", base, {
            "Upload-Length": String(item.file.size),
            "Upload-Metadata": "filename " + b64(item.file.name) + ",relativePath " + b64(item.path),
            "Content-Type": "application/offset+octet-stream",
          }, first, (loaded) => { item.bar.value = loaded; item.moving = loaded; scheduleOverall(); });
          item.moving = 0;
          if (created.status !== 201) {
            if (created.status === 507) throw new Refused(problem(created));
            if (created.status === 409 || created.status === 423 || created.status >= 500) {
              throw new Error("network");
            }
            return show(item, "failed", "not sent: " + problem(created));
          }
          item.url = created.getResponseHeader("Location");
          item.sent = offsetOf(created) || 0;
          item.tries = 0;
          remember(item.fingerprint, item.url);
        } else {
          const head = await request("HEAD", item.url, {}, null);
          if (head.status === 404 || head.status === 410) {
            remember(item.fingerprint, null);
            if (item.restarts >= 3) return show(item, "failed", "not sent: add this file again");
            item.restarts += 1; item.url = null; item.sent = 0;
            continue attempt;
          }
          if (head.status !== 200) throw new Error("network");
          item.sent = offsetOf(head);
          if (Number.isNaN(item.sent)) { item.sent = 0; throw new Error("network"); }
        }
        while (item.sent < item.file.size) {
          show(item, "sending", "sending " + Math.floor(100 * item.sent / Math.max(item.file.size, 1)) + "%");
          const start = item.sent;
          const piece = item.file.slice(start, Math.min(start + chunkSize, item.file.size));
          const answer = await request("PATCH", item.url, {
            "Upload-Offset": String(start), "Content-Type": "application/offset+octet-stream",
          }, piece, (loaded) => {
            item.bar.value = start + loaded; item.moving = start + loaded; scheduleOverall();
          });
          item.moving = 0;
          if (answer.status === 204) {
            const reached = offsetOf(answer);
            if (Number.isNaN(reached) || reached <= start) throw new Error("network");
            item.sent = reached;
            item.tries = 0;
          } else if (answer.status === 404 || answer.status === 410) {
            // the server has no bytes of it (kept by another server): send it again
            remember(item.fingerprint, null);
            if (item.restarts >= 3) return show(item, "failed", "not sent: add this file again");
            item.restarts += 1; item.url = null; item.sent = 0;
            continue attempt;
          } else if (answer.status === 507) {
            throw new Refused(problem(answer));
          } else if (answer.status === 409 || answer.status === 423 || answer.status >= 500) {
            throw new Error("network");
          } else {
            return show(item, "failed", "not sent: " + problem(answer));
          }
        }
        remember(item.fingerprint, null);
        return show(item, "done", "arrived");
      } catch (error) {
        item.tries += 1;
        item.moving = 0;
        const full = error instanceof Refused;
        const offline = navigator.onLine === false;  // "online" wakes it (see sleep)
        const wait = full ? 60000
          : offline ? 30000 : Math.min(30000, 1000 * 2 ** Math.min(item.tries - 1, 5));
        show(item, "retrying", (full ? "the hospital cannot take it now (" + error.message + ")"
                                     : offline ? "offline" : "connection lost") +
             ": trying again " + (offline ? "when back online" :
                                  "in " + Math.round(wait / 1000) + " s"));
        await sleep(wait);
      }
    }
  }

  function readEntries(reader) {
    return new Promise((resolve) => reader.readEntries(resolve, () => resolve([])));
  }

  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((resolve) => entry.file(resolve, () => resolve(null)));
      if (file) add(file, prefix + entry.name);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await readEntries(reader);
        if (!batch.length) break;
        for (const child of batch) await walk(child, prefix + entry.name + "/");
      }
    }
  }

  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const entries = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry());
    if (entries.every(Boolean)) {
      for (const entry of entries) await walk(entry, "");
    } else {
      for (const file of e.dataTransfer.files) add(file, file.name);
    }
  });
  document.getElementById("pick-files").addEventListener("change", (e) => {
    for (const file of e.target.files) add(file, file.name);
    e.target.value = "";
  });
  document.getElementById("pick-folder").addEventListener("change", (e) => {
    for (const file of e.target.files) add(file, file.webkitRelativePath || file.name);
    e.target.value = "";
  });
  document.getElementById("send-form").addEventListener("submit", () => {
    sendButton.disabled = true;
    sendButton.textContent = "Sending… (large CDs take a few minutes)";
  });
  window.addEventListener("beforeunload", (e) => {
    if (items.some((i) => i.state === "sending" || i.state === "retrying" || i.state === "waiting")) {
      e.preventDefault();
    }
  });
  drop.dataset.ready = "1";  // files chosen from now on are taken (tests wait for it)
})();
