// workerlease dashboard: confirmation for actions, and auto-refresh of read-only pages.
// Plain script, no dependencies; the pages work without it (no confirm, no refresh).
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  var status = document.querySelector("[data-refresh-status]");
  if (!seconds) { return; }
  var left = seconds;
  function busy() {
    var active = document.activeElement;
    return active && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }
  setInterval(function () {
    if (busy()) {
      if (status) { status.textContent = "refresh paused while editing"; }
      return;
    }
    left -= 1;
    if (status) { status.textContent = "refreshing in " + left + "s"; }
    if (left <= 0) { window.location.reload(); }
  }, 1000);
})();
