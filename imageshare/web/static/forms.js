// A form that stops something for good (data-confirm) asks first; declined, nothing is sent
// and the form stays usable (this runs before the handlers below). A button of its own
// (Reject beside Accept) asks with its own question.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement)) return;
  const button = event.submitter;
  const asking = button && button.hasAttribute("data-confirm") ? button : form;
  if (!asking.hasAttribute("data-confirm")) return;
  if (!window.confirm(asking.getAttribute("data-confirm") || "Are you sure?")) {
    event.preventDefault();
    event.stopImmediatePropagation();
  }
}, {capture: true});

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
  // The page's own form before the header's (the quick search also posts to /search).
  for (const form of [...document.querySelectorAll("main form"),
                      ...document.querySelectorAll("form")]) {
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
  // Kept also with nothing typed (a password-only form): the refusal is then shown by it.
  const fields = keptFields(form);
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
  const refusal = document.querySelector("main [data-refusal]");
  if (form && (refusal || (draft.refused && draft.path === location.pathname))) {
    putBack(form, draft.fields);
  }
  if (form && refusal && form.closest("main")) showRefusalAt(form, refusal);
});

// A refusal shown on the form's own page (a wrong current password, a bad fingerprint) is
// said next to that form, which may be far down the page or one of several alike (four
// forms of the account page ask for the current password). The keyboard goes to the
// required field left empty (the password or code, cleared), which the refusal then
// describes; with none, to the refusal itself, from which Tab leads into the form.
function showRefusalAt(form, refusal) {
  if (!refusal.id) refusal.id = "refusal";
  form.before(refusal);
  const target = [...form.elements].find((el) =>
    (el instanceof HTMLInputElement || el instanceof HTMLTextAreaElement ||
     el instanceof HTMLSelectElement) && el.required && !el.disabled && el.value === "" &&
    !["hidden", "checkbox", "radio"].includes(el.type) && el.getClientRects().length > 0);
  if (target) {
    const described = (target.getAttribute("aria-describedby") || "").split(" ");
    if (!described.includes(refusal.id)) {
      target.setAttribute("aria-describedby", [...described, refusal.id].join(" ").trim());
    }
    target.focus({preventScroll: true});
  } else {
    refusal.setAttribute("tabindex", "-1");
    refusal.focus({preventScroll: true});
  }
  refusal.scrollIntoView({block: "center"});
}

// Pages that follow something under way (a transfer being sent) look again every few
// seconds, but never while the person is using the page: a reload would drop the keyboard
// focus (the Cancel button could not be reached by Tab) and interrupt a screen reader.
document.addEventListener("DOMContentLoaded", () => {
  const marker = document.querySelector("[data-refresh]");
  if (!marker) return;
  const seconds = Math.max(1, Number(marker.getAttribute("data-refresh")) || 5);
  let touched = Date.now();
  for (const kind of ["keydown", "pointerdown", "focusin", "scroll"]) {
    document.addEventListener(kind, () => { touched = Date.now(); }, {passive: true});
  }
  setInterval(() => {
    const idle = Date.now() - touched >= seconds * 1000;
    const focused = document.activeElement && document.activeElement !== document.body;
    if (idle && !focused && !document.hidden) location.reload();
  }, seconds * 1000);
});
