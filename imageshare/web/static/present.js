// Presentation mode for teaching cases: for each case in order, the question, then every
// image series (cine plays at its frame rate, marks drawn), attached photos and videos, then
// the answer, revealed on demand. Keyboard and presentation clickers: →, PageDown, space next; ←, PageUp back;
// R reveals; F full screen. State for tests is exposed as window.imagesharePresentation.
"use strict";

(function () {
  const manifest = JSON.parse(document.getElementById("present-manifest").textContent);
  const root = document.getElementById("presentation");
  const canvas = document.getElementById("present-canvas");
  const ctx = canvas.getContext("2d");
  const caption = document.getElementById("present-caption");
  const position = document.getElementById("present-position");
  const reveal = document.getElementById("reveal");
  const sections = {
    question: root.querySelector('[data-slide="question"]'),
    images: root.querySelector('[data-slide="images"]'),
    answer: root.querySelector('[data-slide="answer"]'),
  };
  // The running order, as the server sent it: per case a question, its series and
  // attachments, and its answer.
  const order = manifest.slides;
  const state = {index: 0, revealed: false, frame: 0, shownFrames: 0, timer: null,
                 bitmaps: new Map(), media: null};
  window.imagesharePresentation = state;

  function frameUrl(slide, frame) {
    const base = `${manifest.base}/studies/${slide.study}/series/${slide.uid}/instances/${frame.sop}`;
    return frame.multi ? `${base}/frames/${frame.frame}/rendered` : `${base}/rendered`;
  }

  function bitmap(slide, i) {
    const key = `${slide.uid}|${i}`;
    if (!state.bitmaps.has(key)) {
      state.bitmaps.set(key, fetch(frameUrl(slide, slide.frames[i]), {credentials: "same-origin",
        headers: {Accept: slide.colour ? "image/jpeg" : "image/png"}})
        .then((r) => {
          if ((r.status === 401 || r.status === 403) && manifest.linkHome) window.location.assign(manifest.linkHome);
          return r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`));
        })
        .then((b) => createImageBitmap(b)));
    }
    return state.bitmaps.get(key);
  }

  function drawMarks(slide, frame, scale) {
    const marks = slide.marks[`${frame.sop}|${frame.frame}`] || [];
    ctx.lineWidth = 3 / scale; ctx.strokeStyle = "#ffd400"; ctx.fillStyle = "#ffd400";
    ctx.font = `${18 / scale}px sans-serif`;
    for (const m of marks) {
      if (m.kind === "text") { ctx.fillText(m.label || "", m.points[0][0], m.points[0][1]); continue; }
      const [[x1, y1], [x2, y2]] = m.points;
      ctx.beginPath();
      if (m.kind === "ellipse") ctx.ellipse((x1 + x2) / 2, (y1 + y2) / 2, Math.abs(x2 - x1) / 2, Math.abs(y2 - y1) / 2, 0, 0, 2 * Math.PI);
      else { ctx.moveTo(x1, y1); ctx.lineTo(x2, y2); }
      if (m.kind === "arrow") {
        const a = Math.atan2(y1 - y2, x1 - x2);
        for (const t of [0.4, -0.4]) { ctx.moveTo(x2, y2); ctx.lineTo(x2 + (14 / scale) * Math.cos(a + t), y2 + (14 / scale) * Math.sin(a + t)); }
      }
      ctx.stroke();
      if (m.label) ctx.fillText(m.label, (x1 + x2) / 2 + 6 / scale, (y1 + y2) / 2 - 6 / scale);
    }
  }

  async function paint(slide, i) {
    const image = await bitmap(slide, i);
    if (order[state.index] !== slide) return;
    const rect = canvas.getBoundingClientRect();
    canvas.width = Math.max(1, Math.round(rect.width)); canvas.height = Math.max(1, Math.round(rect.height));
    const scale = Math.min(canvas.width / image.width, canvas.height / image.height);
    ctx.setTransform(1, 0, 0, 1, 0, 0); ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.setTransform(scale, 0, 0, scale, (canvas.width - image.width * scale) / 2, (canvas.height - image.height * scale) / 2);
    ctx.drawImage(image, 0, 0);
    drawMarks(slide, slide.frames[i], scale);
    state.frame = i; state.shownFrames += 1;
  }

  function stopCine() { if (state.timer) clearInterval(state.timer); state.timer = null; }

  function showSeries(slide) {
    sections.images.hidden = false;
    canvas.hidden = false;
    caption.textContent = `${slide.modality || ""} ${slide.description || ""}`.trim();
    const n = slide.frames.length;
    for (let i = 0; i < n; i += 1) bitmap(slide, i).catch(() => {});
    paint(slide, 0).catch(() => {});
    if (n > 1) {
      // Cine at the file's rate; a frame not here yet is waited for, not skipped.
      let next = 1, busy = false;
      state.timer = setInterval(() => {
        if (busy) return;
        busy = true;
        paint(slide, next).then(() => { next = (next + 1) % n; }, () => {}).finally(() => { busy = false; });
      }, 1000 / (slide.frameRate || 10));
    }
  }

  function showAttachment(slide) {
    sections.images.hidden = false;
    canvas.hidden = true;
    caption.textContent = slide.title;
    const media = document.createElement(slide.type === "video" ? "video" : "img");
    media.src = slide.url; media.className = "present-media";
    if (slide.type === "video") { media.autoplay = true; media.loop = true; media.muted = true; media.controls = true; }
    sections.images.insertBefore(media, caption);
    state.media = media;
  }

  function go(index) {
    stopCine();
    if (state.media) { state.media.remove(); state.media = null; }
    state.index = Math.max(0, Math.min(order.length - 1, index));
    const slide = order[state.index];
    for (const s of Object.values(sections)) s.hidden = true;
    if (slide.kind === "question") {
      sections.question.hidden = false;
      document.getElementById("question-title").textContent = slide.title;
      document.getElementById("question-history").textContent = slide.history || "";
      document.getElementById("case-count").textContent = slide.count > 1 ? `Case ${slide.number} of ${slide.count}` : "";
    } else if (slide.kind === "answer") {
      sections.answer.hidden = false;
      state.revealed = false;
      reveal.hidden = true;
      reveal.replaceChildren();
      for (const [label, text] of slide.answers) {
        if (!text) continue;
        const h = document.createElement("h3"); h.textContent = label;
        const p = document.createElement("p"); p.textContent = text; p.className = label.toLowerCase();
        reveal.append(h, p);
      }
      document.getElementById("reveal-button").hidden = false;
    }
    else if (slide.kind === "series") showSeries(slide);
    else showAttachment(slide);
    position.textContent = `${state.index + 1} / ${order.length}`;
    root.dataset.slide = slide.kind;
  }

  function showAnswer() {
    if (order[state.index].kind !== "answer") return;
    state.revealed = true; reveal.hidden = false; document.getElementById("reveal-button").hidden = true;
  }
  const fullscreen = () => (document.fullscreenElement ? document.exitFullscreen() : root.requestFullscreen().catch(() => {}));

  document.getElementById("present-next").addEventListener("click", () => go(state.index + 1));
  document.getElementById("present-prev").addEventListener("click", () => go(state.index - 1));
  document.getElementById("present-full").addEventListener("click", fullscreen);
  document.getElementById("reveal-button").addEventListener("click", showAnswer);
  document.addEventListener("keydown", (event) => {
    const keys = {
      ArrowRight: () => go(state.index + 1), PageDown: () => go(state.index + 1), " ": () => go(state.index + 1),
      ArrowDown: () => go(state.index + 1), ArrowLeft: () => go(state.index - 1), PageUp: () => go(state.index - 1),
      ArrowUp: () => go(state.index - 1), Home: () => go(0), End: () => go(order.length - 1),
      r: showAnswer, R: showAnswer, f: fullscreen, F: fullscreen,
    };
    const action = keys[event.key];
    if (action) { event.preventDefault(); action(); }
  });
  go(0);
  root.focus();
})();
