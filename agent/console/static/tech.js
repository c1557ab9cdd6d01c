// Enroll: the button notes "enroll started" in the journal (POST with the CSRF token in a
// header), then the next card read on any reader is shown in all its forms, and "enroll
// stopped" is noted.
(function () {
  "use strict";
  var button = document.getElementById("enroll");
  var state = document.getElementById("enroll-state");
  var table = document.getElementById("enroll-forms");
  var armed = false;
  function note(action) {
    return fetch("/tech/enroll", {method: "POST", credentials: "same-origin", body: new URLSearchParams({action: action}),
      headers: {"X-CSRF-Token": button.dataset.csrf, "Accept": "application/json"}});
  }
  button.addEventListener("click", function () {
    note("started")
      .then(function (r) { return r.json(); })
      .then(function (reply) {
        armed = true;
        table.hidden = true;
        state.textContent = reply.ok ? state.dataset.waiting : reply.message;
      });
  });
  document.addEventListener("gate-record", function (ev) {
    var rec = ev.detail;
    if (!armed || rec._past || !rec._forms) return;
    armed = false;
    var forms = Object.assign({reader: rec.reader || "", format: rec.format || ""}, rec._forms);
    table.querySelectorAll("[data-form]").forEach(function (c) {
      var v = forms[c.dataset.form];
      c.textContent = v === null || v === undefined ? "-" : String(v);
    });
    table.hidden = false;
    state.textContent = "";
    note("stopped");  // the journal says when the enrolment ended, as well as when it began
  });
})();
