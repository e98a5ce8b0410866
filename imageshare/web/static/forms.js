// Forms that create something (data-once) are sent once: a second click while the first
// sending is on its way does nothing (the server also handles each rendering once).
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-once")) return;
  if (form.dataset.sent === "1") {
    event.preventDefault();
    return;
  }
  form.dataset.sent = "1";
  for (const button of form.querySelectorAll("button[type=submit]")) {
    button.setAttribute("aria-disabled", "true");
    button.classList.add("sending");
  }
});

// What was typed survives a refusal. When a form is sent, what the person typed (never
// passwords, codes, passcodes, files or hidden fields) is kept in this tab's session storage;
// the next page either refuses (an error shown on the same form, or the error page, whose
// "Back to the form" returns to it) and the typing is put back, or it does not and the copy
// is dropped at once. Nothing leaves the browser.
const DRAFT = "imageshare-draft";
const SKIPPED = new Set(["hidden", "password", "file", "submit", "button", "reset", "image"]);
const SECRET_NAMES = new Set(["csrf_token", "form_key", "passcode", "code", "password",
                              "current", "new"]);

function keptFields(form) {
  const fields = [];
  for (const el of form.elements) {
    if (!el.name || SECRET_NAMES.has(el.name) || el.disabled) continue;
    if (el.autocomplete === "one-time-code") continue;
    if (el instanceof HTMLInputElement) {
      if (SKIPPED.has(el.type)) continue;
      if (el.type === "checkbox" || el.type === "radio") {
        fields.push([el.name, el.value, el.checked]);
      } else {
        fields.push([el.name, el.value, null]);
      }
    } else if (el instanceof HTMLTextAreaElement || el instanceof HTMLSelectElement) {
      fields.push([el.name, el.value, null]);
    }
  }
  return fields;
}

function formFor(draft) {
  for (const form of document.querySelectorAll("form")) {
    if ((form.getAttribute("action") || "") === draft.action) return form;
  }
  return null;
}

function putBack(form, fields) {
  const seen = {};
  for (const [name, value, checked] of fields) {
    const index = seen[name] || 0;
    seen[name] = index + 1;
    if (checked !== null) {
      for (const el of form.elements) {
        if (el.name === name && el.value === value) el.checked = checked;
      }
      continue;
    }
    const el = [...form.elements].filter((e) => e.name === name)[index];
    if (el && !(el instanceof HTMLInputElement && SKIPPED.has(el.type))) el.value = value;
  }
}

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement) || (form.method || "").toLowerCase() !== "post") return;
  if (form.hasAttribute("data-no-draft")) return;
  const fields = keptFields(form);
  if (!fields.some(([, value, checked]) => checked === null ? value !== "" : checked)) return;
  const draft = {action: form.getAttribute("action") || "", path: location.pathname, fields,
                 refused: false};
  const text = JSON.stringify(draft);
  try {
    if (text.length <= 64 * 1024) sessionStorage.setItem(DRAFT, text);
  } catch (_) { /* storage off or full: nothing is kept */ }
});

document.addEventListener("DOMContentLoaded", () => {
  for (const back of document.querySelectorAll("a[data-back]")) {
    if (history.length > 1) back.addEventListener("click", (event) => {
      event.preventDefault();
      history.back();
    });
  }
  let draft = null;
  try {
    draft = JSON.parse(sessionStorage.getItem(DRAFT) || "null");
    sessionStorage.removeItem(DRAFT);
  } catch (_) {
    return;
  }
  if (!draft || typeof draft.action !== "string" || !Array.isArray(draft.fields)) return;
  if (document.body.classList.contains("refused")) {
    // The error page: keep the copy for the way back to the form.
    draft.refused = true;
    try { sessionStorage.setItem(DRAFT, JSON.stringify(draft)); } catch (_) { /* none */ }
    return;
  }
  const form = formFor(draft);
  const refusedHere = document.querySelector("main [data-refusal]") !== null;
  if (form && (refusedHere || (draft.refused && draft.path === location.pathname))) {
    putBack(form, draft.fields);
  }
});
