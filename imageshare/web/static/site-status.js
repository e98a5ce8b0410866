// Follows the live status per site on the study page: while a site is being checked or a
// study downloaded, the panel is fetched again (same origin, the session's cookie) and
// swapped in, until nothing changes by itself any more.
(function () {
  "use strict";
  const box = document.querySelector("[data-live-status]");
  if (!box) {
    return;
  }
  async function poll() {
    if (!box.querySelector(".busy")) {
      return;
    }
    try {
      const answer = await fetch(box.dataset.liveStatus, {
        headers: { Accept: "text/html" }, credentials: "same-origin", cache: "no-store",
      });
      if (answer.ok) {
        box.innerHTML = await answer.text();
      }
    } catch (error) {
      // the next poll tries again
    }
    window.setTimeout(poll, 700);
  }
  window.setTimeout(poll, 700);
}());
