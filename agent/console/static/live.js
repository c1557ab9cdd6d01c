// Live passages: the console's feed (Server-Sent Events), newest first, filtered here in
// the page by type, reader, direction and person or card. Keeps the last 500 rows.
(function () {
  "use strict";
  var body = document.querySelector("#live tbody");
  var link = document.getElementById("link");
  var f = {type: document.getElementById("f-type"), reader: document.getElementById("f-reader"),
           direction: document.getElementById("f-direction"), person: document.getElementById("f-person")};
  var MAX = 500;
  function shown(rec) {
    if (f.type.value && rec.type !== f.type.value) return false;
    if (f.reader.value && rec.reader !== f.reader.value) return false;
    if (f.direction.value && rec.direction !== f.direction.value) return false;
    var q = f.person.value.trim();
    if (q) {
      var forms = rec._forms || {};
      var hay = [rec.person, rec.card, forms.facility_card, forms.em_print, forms.hex].join(" ");
      if (hay.indexOf(q) < 0) return false;
    }
    return true;
  }
  function cell(tr, text) {
    var td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    tr.appendChild(td);
  }
  function add(rec) {
    var tr = document.createElement("tr");
    tr.dataset.rec = JSON.stringify(rec);
    tr.className = "t-" + String(rec.type).replace(/\./g, "-");
    cell(tr, rec._time);
    cell(tr, rec.type);
    cell(tr, rec.reader);
    var table = document.getElementById("live").dataset;
    cell(tr, rec.direction === "in" ? table.in : rec.direction === "out" ? table.out : rec.direction);
    cell(tr, rec.person);
    cell(tr, rec._forms ? rec._forms.facility_card + " / " + (rec._forms.em_print || rec._forms.hex) : rec.card);
    cell(tr, rec.reason || rec.source || rec.kind || rec.to || "");
    tr.hidden = !shown(rec);
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > MAX) body.deleteRow(body.rows.length - 1);
  }
  function refilter() {
    Array.prototype.forEach.call(body.rows, function (tr) { tr.hidden = !shown(JSON.parse(tr.dataset.rec)); });
  }
  Object.keys(f).forEach(function (k) { f[k].addEventListener("input", refilter); f[k].addEventListener("change", refilter); });
  document.getElementById("filters").addEventListener("submit", function (ev) { ev.preventDefault(); });
  var es = new EventSource("/live/events");
  es.addEventListener("record", function (ev) { add(JSON.parse(ev.data)); });
  es.addEventListener("link", function (ev) {
    var up = JSON.parse(ev.data);
    link.textContent = up ? link.dataset.up : link.dataset.down;
    link.className = up ? "good" : "bad";
  });
  es.addEventListener("gap", function (ev) { link.textContent = link.dataset.gap + ": " + ev.data; });
  es.addEventListener("logout", function () { es.close(); window.location = "/login"; });
})();
