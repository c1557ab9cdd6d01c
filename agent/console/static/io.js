// The live state of the lines (status and technician pages): one EventSource on the
// console's feed; each status (1 s) updates the cells marked data-out / data-in, and each
// record is handed on as a "gate-record" event (the technician page's enroll listens).
(function () {
  "use strict";
  var words = document.getElementById("io-words").dataset;
  var es = new EventSource("/live/events");
  function set(cell, on, yes, no) {
    cell.textContent = on ? yes : no;
    cell.className = on ? "on" : "off";
  }
  es.addEventListener("status", function (ev) {
    var st = JSON.parse(ev.data);
    document.querySelectorAll("[data-out]").forEach(function (c) {
      var v = (st.outputs || {})[c.dataset.out];
      if (v !== undefined) set(c, v, words.active, words.inactive);
    });
    document.querySelectorAll("[data-in]").forEach(function (c) {
      var v = (st.inputs || {})[c.dataset.in];
      if (v !== undefined) set(c, v.active, words.asserted, words.rest);
    });
  });
  es.addEventListener("record", function (ev) {
    document.dispatchEvent(new CustomEvent("gate-record", {detail: JSON.parse(ev.data)}));
  });
  es.addEventListener("logout", function () { es.close(); window.location = "/login"; });
})();
