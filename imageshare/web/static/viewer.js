// ImageShare viewer: draws frames that the server decodes and renders (WADO-RS /rendered).
// No DICOM decoding happens in the browser; nothing is fetched from outside this server.
// Stack scrolling, cine at the file's frame rate, window/level, zoom, pan, fit, full screen,
// keyboard and touch. State for tests is exposed as window.imageshareViewer.
"use strict";

(function () {
  const manifest = JSON.parse(document.getElementById("manifest").textContent);
  const canvas = document.getElementById("canvas");
  const wrap = document.getElementById("canvas-wrap");
  const ctx = canvas.getContext("2d");
  const slider = document.getElementById("slider");
  const position = document.getElementById("position");
  const playButton = document.getElementById("play");
  const fpsInput = document.getElementById("fps");
  const status = document.getElementById("status");
  const overlayTl = document.getElementById("overlay-tl");
  const overlayBr = document.getElementById("overlay-br");
  const MAX_IN_FLIGHT = 6;

  const state = {
    seriesIndex: -1,
    series: null,
    index: 0,
    window: null,           // [center, width] chosen by the user, or null for the file's own
    zoom: 1, panX: 0, panY: 0, fitted: true,
    tool: "window",
    playing: false, fps: 30, clockStart: 0, clockIndex: 0,
    cache: new Map(),       // key -> {bitmap, promise}
    generation: 0,          // bumps when the series or window changes: stale loads are dropped
    shown: [],              // [time ms, frame index] of every frame drawn (for tests)
    marks: manifest.annotations || {},  // "SOP|frame" -> [{kind, points, label, author}]
    pending: null,          // the mark being drawn
    unsaved: new Set(),     // frames whose marks changed since the last save
    view: null,             // {scale, ox, oy} of the image on the canvas
    firstImageMs: null,
    firstPlayMs: null,      // ms from opening the series to cine starting (for benchmarks)
    errors: 0,
  };
  window.imageshareViewer = state;

  // -- loading ------------------------------------------------------------------------------

  let queue = [];
  let inFlight = 0;

  function windowKey() {
    return state.window ? state.window.map((v) => Math.round(v)).join(",") : "default";
  }

  function frameUrl(series, frame) {
    const base = `${manifest.base || "/dicomweb"}/studies/${series.study || manifest.study}/series/${series.uid}/instances/${frame.sop}`;
    const url = frame.multi ? `${base}/frames/${frame.frame}/rendered` : `${base}/rendered`;
    const params = new URLSearchParams();
    if (state.window) params.set("window", state.window.map((v) => v.toFixed(1)).join(","));
    if (series.colour) params.set("quality", "90");
    const query = params.toString();
    return query ? `${url}?${query}` : url;
  }

  function cacheKey(index) {
    return `${state.seriesIndex}|${index}|${windowKey()}`;
  }

  function load(index, urgent) {
    const key = cacheKey(index);
    const known = state.cache.get(key);
    if (known) return known.promise;
    const series = state.series;
    const entry = {bitmap: null, promise: null};
    entry.promise = new Promise((resolve, reject) => {
      const job = {key, run: async () => {
        const response = await fetch(frameUrl(series, series.frames[index]), {
          credentials: "same-origin",
          headers: {Accept: series.colour ? "image/jpeg" : "image/png"},
        });
        // 401 (no link session) or 403 (a signed-in recipient the link no longer serves)
        if ((response.status === 401 || response.status === 403) && manifest.linkHome) linkEnded();
        if (!response.ok) throw new Error(`frame ${index + 1}: HTTP ${response.status}`);
        const blob = await response.blob();
        entry.bitmap = await createImageBitmap(blob);
        return entry.bitmap;
      }, resolve, reject};
      if (urgent) queue.unshift(job); else queue.push(job);
    });
    entry.promise.catch(() => { state.cache.delete(key); state.errors += 1; });
    state.cache.set(key, entry);
    pump();
    return entry.promise;
  }

  function linkEnded() {
    // The link ended (revoked, expired, locked) while open: its own page says so.
    if (state.linkEnded) return;
    state.linkEnded = true;
    queue = [];
    window.location.replace(manifest.linkHome);
  }

  function pump() {
    while (inFlight < MAX_IN_FLIGHT && queue.length) {
      const job = queue.shift();
      if (!state.cache.has(job.key)) continue;
      inFlight += 1;
      job.run().then(job.resolve, job.reject).finally(() => { inFlight -= 1; pump(); });
    }
  }

  function bitmapAt(index) {
    const entry = state.cache.get(cacheKey(index));
    return entry ? entry.bitmap : null;
  }

  function prefetch() {
    // Nearest frames first, so that scrolling either way finds them ready.
    const n = state.series.frames.length;
    const order = [];
    for (let d = 1; d < n; d += 1) {
      if (state.series.cine) { order.push((state.index + d) % n); continue; }
      if (state.index + d < n) order.push(state.index + d);
      if (state.index - d >= 0) order.push(state.index - d);
    }
    queue = queue.filter((job) => state.cache.has(job.key));
    for (const i of order) load(i, false).catch(() => {});
  }

  function buffered() {
    let count = 0;
    for (let i = 0; i < state.series.frames.length; i += 1) if (bitmapAt(i)) count += 1;
    return count;
  }

  // -- drawing ------------------------------------------------------------------------------

  function resize() {
    const ratio = window.devicePixelRatio || 1;
    const rect = wrap.getBoundingClientRect();
    canvas.width = Math.max(1, Math.round(rect.width * ratio));
    canvas.height = Math.max(1, Math.round(rect.height * ratio));
    canvas.style.width = `${rect.width}px`;
    canvas.style.height = `${rect.height}px`;
    draw();
  }

  function fitScale(bitmap) {
    return Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
  }

  let lastBitmap = null;
  function draw() {
    const bitmap = bitmapAt(state.index) || lastBitmap;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!bitmap) return;
    const scale = fitScale(bitmap) * state.zoom;
    const ratio = window.devicePixelRatio || 1;
    ctx.setTransform(scale, 0, 0, scale,
      canvas.width / 2 + state.panX * ratio - (bitmap.width * scale) / 2,
      canvas.height / 2 + state.panY * ratio - (bitmap.height * scale) / 2);
    ctx.imageSmoothingEnabled = scale < 4;
    ctx.drawImage(bitmap, 0, 0);
    state.view = {scale,
      ox: canvas.width / 2 + state.panX * ratio - (bitmap.width * scale) / 2,
      oy: canvas.height / 2 + state.panY * ratio - (bitmap.height * scale) / 2};
    drawMarks(scale);
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    overlayBr.textContent = `${state.window ? `W ${Math.round(state.window[1])} L ${Math.round(state.window[0])}` : "W/L as stored"} · ${Math.round(state.zoom * 100)}%`;
  }

  // -- marks (arrows, lengths, text, ellipses) -------------------------------------------

  function frameKey() {
    const frame = state.series.frames[state.index];
    return `${frame.sop}|${frame.frame}`;
  }

  function lengthText(mark) {
    const [[x1, y1], [x2, y2]] = mark.points;
    const spacing = state.series.spacing;
    if (spacing) return `${Math.hypot((x2 - x1) * spacing[1], (y2 - y1) * spacing[0]).toFixed(1)} mm`;
    return `${Math.hypot(x2 - x1, y2 - y1).toFixed(0)} px`;
  }

  function areaText(mark) {
    const [[x1, y1], [x2, y2]] = mark.points;
    const area = Math.PI * (Math.abs(x2 - x1) / 2) * (Math.abs(y2 - y1) / 2);
    const spacing = state.series.spacing;
    if (spacing) return `${(area * spacing[0] * spacing[1]).toFixed(1)} mm2`;
    return `${area.toFixed(0)} px2`;
  }

  // A mark's words in yellow on a dark outline: readable on white bone and on black air.
  function markText(text, x, y, scale) {
    ctx.save();
    ctx.lineWidth = 3 / scale;
    ctx.lineJoin = "round";
    ctx.strokeStyle = "rgba(0, 0, 0, 0.85)";
    ctx.strokeText(text, x, y);
    ctx.restore();
    ctx.fillText(text, x, y);
  }

  function drawMarks(scale) {
    const marks = (state.marks[frameKey()] || []).concat(state.pending ? [state.pending] : []);
    ctx.lineWidth = 2 / scale;
    ctx.strokeStyle = "#ffd400";
    ctx.fillStyle = "#ffd400";
    ctx.font = `${14 / scale}px sans-serif`;
    for (const mark of marks) {
      if (mark.kind === "text") {
        const [x, y] = mark.points[0];
        markText(mark.label || "", x, y, scale);
        continue;
      }
      const [[x1, y1], [x2, y2]] = mark.points;
      ctx.beginPath();
      if (mark.kind === "ellipse") {
        ctx.ellipse((x1 + x2) / 2, (y1 + y2) / 2, Math.abs(x2 - x1) / 2, Math.abs(y2 - y1) / 2, 0, 0, 2 * Math.PI);
      } else {
        ctx.moveTo(x1, y1); ctx.lineTo(x2, y2);
      }
      if (mark.kind === "arrow") {
        const angle = Math.atan2(y1 - y2, x1 - x2);
        for (const turn of [0.4, -0.4]) {
          ctx.moveTo(x2, y2);
          ctx.lineTo(x2 + (12 / scale) * Math.cos(angle + turn), y2 + (12 / scale) * Math.sin(angle + turn));
        }
      }
      ctx.stroke();
      const text = mark.label || (mark.kind === "length" ? lengthText(mark)
        : mark.kind === "ellipse" ? areaText(mark) : "");
      if (text) markText(text, (x1 + x2) / 2 + 6 / scale, (y1 + y2) / 2 - 6 / scale, scale);
    }
  }

  function clampPoint([x, y]) {
    const frame = bitmapAt(state.index) || lastBitmap;
    if (!frame) return [x, y];
    return [Math.max(0, Math.min(frame.width, x)), Math.max(0, Math.min(frame.height, y))];
  }

  function imagePoint(event) {
    const rect = canvas.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    const v = state.view || {scale: 1, ox: 0, oy: 0};
    return [((event.clientX - rect.left) * ratio - v.ox) / v.scale,
            ((event.clientY - rect.top) * ratio - v.oy) / v.scale];
  }

  function mine(key) {
    return (state.marks[key] || []).filter((m) => !m.author || m.author === manifest.me);
  }

  async function saveMarks(key) {
    const [sop, frame] = key.split("|");
    const csrf = document.querySelector('meta[name="csrf-token"]').content;
    const response = await fetch(manifest.annotationsUrl, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify({sop_uid: sop, frame: Number(frame),
                            marks: mine(key).map(({kind, points, label}) => ({kind, points, label}))}),
    });
    if (!response.ok) { status.textContent = `Marks not saved (HTTP ${response.status}).`; return; }
    for (const m of state.marks[key] || []) if (!m.author) m.author = manifest.me;
    state.unsaved.delete(key);
    state.savedMarks = (state.savedMarks || 0) + 1;
    updateSaveButton();
    status.textContent = "Marks saved.";
    setTimeout(() => { if (status.textContent === "Marks saved.") status.textContent = ""; }, 1500);
  }

  // Drawing tools only where the server keeps the marks: the manifest says so per series
  // ("annotate": every image; else "annotateSops": those that may be marked). A manifest
  // saying neither (older pages) leaves it to annotationsUrl alone.
  const DRAWING = ["arrow", "length", "ellipse", "text"];

  function canMark() {
    const series = state.series;
    if (!manifest.annotationsUrl || !series) return false;
    if (series.annotate !== undefined && !series.annotate) {
      const frame = series.frames[state.index];
      return Boolean(frame) && (series.annotateSops || []).includes(frame.sop);
    }
    return true;
  }

  function updateMarkTools() {
    const allowed = canMark();
    document.querySelectorAll(".mark-tool").forEach((b) => { b.hidden = !allowed; });
    if (!allowed) {
      state.pending = null;
      if (DRAWING.includes(state.tool)) setTool("window");
    }
  }

  function updateSaveButton() {
    const button = document.getElementById("save-marks");
    if (button) button.disabled = !state.unsaved.has(frameKey());
  }

  // -- video (MPEG-4 AVC / HEVC instances): the browser's own player, rendered as video/mp4 --

  let player = null;

  function showVideo(index) {
    const series = state.series;
    const frame = series.frames[index];
    if (!player) {
      player = document.createElement("video");
      player.id = "video";
      player.className = "video-player";
      player.controls = true; player.muted = true; player.loop = true; player.playsInline = true;
      player.addEventListener("error", () => {
        status.textContent = "This video cannot be played here; download the study instead.";
      });
      wrap.append(player);
    }
    canvas.hidden = true;
    player.hidden = false;
    const url = `${manifest.base || "/dicomweb"}/studies/${series.study || manifest.study}` +
      `/series/${series.uid}/instances/${frame.sop}/rendered`;
    if (player.dataset.src !== url) {
      player.dataset.src = url;
      player.src = url;
      player.play().catch(() => { /* autoplay refused: the controls start it */ });
    }
    status.textContent = "";
  }

  function hideVideo() {
    if (!player) return;
    player.pause();
    player.removeAttribute("src");
    delete player.dataset.src;
    player.load();
    player.hidden = true;
    canvas.hidden = false;
  }

  function show(index) {
    const n = state.series.frames.length;
    state.index = Math.max(0, Math.min(n - 1, index));
    slider.value = String(state.index);
    position.textContent = `${state.index + 1} / ${n}`;
    overlayTl.textContent = `${state.series.modality} ${state.series.description || ""} · ${state.index + 1}/${n}`;
    const target = document.getElementById("comment-sop");
    if (target) target.value = state.series.frames[state.index].sop;
    updateMarkTools();
    updateSaveButton();
    if (state.series.video) {
      overlayTl.textContent = `${state.series.modality} ${state.series.description || ""} · video ${state.index + 1}/${n}`;
      showVideo(state.index);
      return;
    }
    const bitmap = bitmapAt(state.index);
    if (bitmap) {
      lastBitmap = bitmap;
      draw();
      state.shown.push([performance.now(), state.index]);
      if (state.shown.length > 5000) state.shown.splice(0, 1000);
      return;
    }
    const generation = state.generation;
    const wanted = state.index;
    load(wanted, true).then(() => {
      if (generation === state.generation && state.index === wanted) show(wanted);
    }, (error) => { status.textContent = `Could not load the image (${error.message}).`; });
  }

  // -- series -------------------------------------------------------------------------------

  function openSeries(seriesIndex) {
    stop();
    state.autoplay = true;  // a cine loop plays by itself once enough has arrived
    state.seriesIndex = seriesIndex;
    state.series = manifest.series[seriesIndex];
    state.generation += 1;
    state.cache.clear();
    queue = [];
    state.window = null;
    state.zoom = 1; state.panX = 0; state.panY = 0;
    lastBitmap = null;
    const n = state.series.frames.length;
    slider.max = String(Math.max(0, n - 1));
    state.fps = state.series.frameRate || 10;
    fpsInput.value = String(Math.round(state.fps * 10) / 10);
    document.querySelectorAll(".series-button").forEach((b) => {
      b.setAttribute("aria-current", String(Number(b.dataset.index) === seriesIndex));
    });
    status.textContent = "";
    if (state.series.video) { show(0); return; }
    hideVideo();
    const started = performance.now();
    const generation = state.generation;
    const start = 0;
    load(start, true).then(() => {
      if (generation !== state.generation) return;
      if (state.firstImageMs === null) state.firstImageMs = performance.now() - started;
      show(start);
      if (state.series.cine) waitAndPlay(generation, started);
    }, (error) => { status.textContent = `Could not load the image (${error.message}).`; });
    // The other frames are asked for at once, behind the first (which goes first).
    prefetch();
  }

  function waitAndPlay(generation, started) {
    // Cine starts as soon as the frames already here, played at the file's rate, last until
    // the rest have arrived at the rate they are arriving: it plays at once on a fast link
    // and never stalls on a slow one. (Frames load in playing order, nearest first.)
    const n = state.series.frames.length;
    const check = () => {
      if (generation !== state.generation || state.playing) return;
      if (!state.autoplay) {
        // Someone who paused, stepped or started a mark meanwhile keeps their frame.
        status.textContent = buffered() < n ? `Loading ${buffered()} / ${n} frames` : "";
        if (buffered() < n) setTimeout(check, 100);
        return;
      }
      let ahead = 0;
      while (ahead < n && bitmapAt((state.index + ahead) % n)) ahead += 1;
      const elapsed = Math.max(1, performance.now() - started);
      const perFrameLoad = elapsed / Math.max(1, buffered());
      const remainingLoad = (n - buffered()) * perFrameLoad;
      const playable = (ahead * 1000) / (state.fps || 10);
      status.textContent = ahead < n ? `Loading ${buffered()} / ${n} frames` : "";
      if (ahead >= n || (ahead >= 2 && remainingLoad <= playable)) {
        if (state.firstPlayMs === null) state.firstPlayMs = performance.now() - started;
        play();
        const clear = () => {
          if (generation !== state.generation) return;
          if (buffered() >= n) status.textContent = "";
          else { status.textContent = `Loading ${buffered()} / ${n} frames`; setTimeout(clear, 100); }
        };
        clear();
      } else setTimeout(check, 20);
    };
    check();
  }

  // -- cine ---------------------------------------------------------------------------------

  function tick(now) {
    if (!state.playing) return;
    const n = state.series.frames.length;
    const steps = Math.floor(((now - state.clockStart) * state.fps) / 1000);
    const target = (state.clockIndex + steps) % n;
    if (target !== state.index) {
      if (bitmapAt(target)) {
        show(target);
      } else {
        // Not here yet: hold the clock at this frame instead of skipping.
        state.clockStart = now;
        state.clockIndex = state.index;
      }
    }
    requestAnimationFrame(tick);
  }

  function play() {
    if (state.series.video) {  // the player's own playback
      if (player) player.play().catch(() => {});
      return;
    }
    if (state.playing || state.series.frames.length < 2) return;
    state.playing = true;
    state.clockStart = performance.now();
    state.clockIndex = state.index;
    playButton.textContent = "Pause";
    playButton.setAttribute("aria-pressed", "true");
    requestAnimationFrame(tick);
  }

  function stop() {
    state.playing = false;
    state.autoplay = false;
    playButton.textContent = "Play";
    playButton.setAttribute("aria-pressed", "false");
  }

  function step(delta) {
    stop();
    const n = state.series.frames.length;
    show(state.series.cine ? (state.index + delta + n) % n : state.index + delta);
  }

  // -- window/level, zoom, pan -------------------------------------------------------------

  let windowRequest = null;
  function setWindow(center, width) {
    state.window = [center, Math.max(1, width)];
    state.generation += 1;
    // Render the frame on screen at the new window; newer requests overtake older ones.
    const generation = state.generation;
    const index = state.index;
    if (windowRequest) return;
    windowRequest = load(index, true).then(() => {
      windowRequest = null;
      if (generation === state.generation) show(index);
      else setWindow(state.window[0], state.window[1]);
    }, () => { windowRequest = null; });
    draw();
  }

  function startingWindow() {
    return state.window || state.series.window || [128, 256];
  }

  function setTool(tool) {
    state.tool = tool;
    document.querySelectorAll("[data-tool]").forEach((b) => {
      b.setAttribute("aria-pressed", String(b.dataset.tool === tool));
    });
  }

  function zoomBy(factor) {
    state.zoom = Math.max(0.1, Math.min(40, state.zoom * factor));
    draw();
  }

  function fit() { state.zoom = 1; state.panX = 0; state.panY = 0; draw(); }

  function reset() {
    fit();
    if (state.window) {
      state.window = null;
      state.generation += 1;
      show(state.index);
      prefetch();
    }
  }

  const pointers = new Map();
  let drag = null;
  canvas.addEventListener("pointerdown", (event) => {
    canvas.focus();
    if (DRAWING.includes(state.tool) && !canMark()) setTool("window");
    if (state.tool === "text") {
      stop();
      const at = clampPoint(imagePoint(event));
      const label = (window.prompt("Text for this mark") || "").trim().slice(0, 64);
      if (label) {
        const key = frameKey();
        (state.marks[key] = state.marks[key] || []).push({kind: "text", points: [at], label});
        state.unsaved.add(key);
        updateSaveButton();
        draw();
      }
      return;
    }
    if (state.tool === "arrow" || state.tool === "length" || state.tool === "ellipse") {
      stop();
      const start = clampPoint(imagePoint(event));
      state.pending = {kind: state.tool, points: [start, start]};
      canvas.setPointerCapture(event.pointerId);
      return;
    }
    canvas.setPointerCapture(event.pointerId);
    pointers.set(event.pointerId, {x: event.clientX, y: event.clientY});
    drag = {x: event.clientX, y: event.clientY, window: startingWindow().slice(),
            zoom: state.zoom, panX: state.panX, panY: state.panY,
            pinch: pointers.size === 2 ? pinchDistance() : null};
  });
  canvas.addEventListener("pointermove", (event) => {
    if (state.pending) {
      state.pending.points = [state.pending.points[0], clampPoint(imagePoint(event))];
      draw();
      return;
    }
    if (!drag || !pointers.has(event.pointerId)) return;
    pointers.set(event.pointerId, {x: event.clientX, y: event.clientY});
    if (pointers.size === 2 && drag.pinch) {
      state.zoom = Math.max(0.1, Math.min(40, drag.zoom * (pinchDistance() / drag.pinch)));
      draw();
      return;
    }
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    const tool = event.buttons === 4 ? "pan" : event.buttons === 2 ? "zoom" : state.tool;
    if (tool === "pan") {
      state.panX = drag.panX + dx; state.panY = drag.panY + dy; draw();
    } else if (tool === "zoom") {
      state.zoom = Math.max(0.1, Math.min(40, drag.zoom * Math.exp(-dy / 200))); draw();
    } else {
      const [center, width] = drag.window;
      const sensitivity = Math.max(width, 10) / 300;
      setWindow(center + dy * sensitivity, width + dx * sensitivity);
    }
  });
  const endDrag = (event) => {
    if (state.pending) {
      const mark = state.pending;
      state.pending = null;
      const [[x1, y1], [x2, y2]] = mark.points;
      if (Math.hypot(x2 - x1, y2 - y1) > 3) {
        const key = frameKey();
        (state.marks[key] = state.marks[key] || []).push(mark);
        state.unsaved.add(key);
        updateSaveButton();
        // The measurement in words too (read out by a screen reader), and what keeps it.
        const measured = mark.kind === "length" ? `Length ${lengthText(mark)}`
          : mark.kind === "ellipse" ? `Area ${areaText(mark)}` : "Mark added";
        status.textContent = `${measured}: not saved yet (Save marks keeps it).`;
      }
      draw();
      return;
    }
    pointers.delete(event.pointerId);
    if (pointers.size === 0) {
      if (drag && state.tool === "window" && state.window) prefetch();
      drag = null;
    }
  };
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", endDrag);
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  function pinchDistance() {
    const [a, b] = [...pointers.values()];
    return Math.hypot(a.x - b.x, a.y - b.y) || 1;
  }

  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    if (event.ctrlKey) zoomBy(event.deltaY < 0 ? 1.1 : 1 / 1.1);
    else step(event.deltaY > 0 ? 1 : -1);
  }, {passive: false});

  // -- controls -----------------------------------------------------------------------------

  document.querySelectorAll("[data-tool]").forEach((b) => {
    b.addEventListener("click", () => setTool(b.dataset.tool));
  });
  document.querySelectorAll(".series-button").forEach((b) => {
    b.addEventListener("click", () => openSeries(Number(b.dataset.index)));
  });
  document.getElementById("fit").addEventListener("click", fit);
  const saveButton = document.getElementById("save-marks");
  if (saveButton) saveButton.addEventListener("click", () => saveMarks(frameKey()));
  const clearButton = document.getElementById("clear-marks");
  if (clearButton) clearButton.addEventListener("click", () => {
    const key = frameKey();
    state.marks[key] = (state.marks[key] || []).filter((m) => m.author && m.author !== manifest.me);
    draw();
    saveMarks(key);
  });
  document.getElementById("reset").addEventListener("click", reset);
  document.getElementById("prev").addEventListener("click", () => step(-1));
  document.getElementById("next").addEventListener("click", () => step(1));
  playButton.addEventListener("click", () => (state.playing ? stop() : play()));
  slider.addEventListener("input", () => { stop(); show(Number(slider.value)); });
  fpsInput.addEventListener("change", () => {
    const value = Number(fpsInput.value);
    if (value > 0 && value <= 120) {
      state.clockStart = performance.now(); state.clockIndex = state.index; state.fps = value;
    }
  });
  const fullscreen = () => {
    if (document.fullscreenElement) document.exitFullscreen();
    else document.getElementById("viewer").requestFullscreen().catch(() => {});
  };
  document.getElementById("fullscreen").addEventListener("click", fullscreen);

  document.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement && event.target.type !== "range") return;
    const keys = {
      ArrowDown: () => step(1), ArrowRight: () => step(1), j: () => step(1),
      ArrowUp: () => step(-1), ArrowLeft: () => step(-1), k: () => step(-1),
      PageDown: () => step(10), PageUp: () => step(-10),
      Home: () => { stop(); show(0); },
      End: () => { stop(); show(state.series.frames.length - 1); },
      " ": () => (state.playing ? stop() : play()),
      f: fit, r: reset, F: fullscreen,
      "+": () => zoomBy(1.25), "=": () => zoomBy(1.25), "-": () => zoomBy(0.8),
      w: () => setTool("window"), p: () => setTool("pan"), z: () => setTool("zoom"),
      a: () => canMark() && setTool("arrow"),
      m: () => canMark() && setTool("length"),
      e: () => canMark() && setTool("ellipse"),
      t: () => canMark() && setTool("text"),
    };
    const action = keys[event.key];
    if (action) { event.preventDefault(); action(); }
  });

  new ResizeObserver(resize).observe(wrap);
  if (manifest.series.length) openSeries(manifest.initial || 0);
  else status.textContent = "This study has no images to show.";
})();
