// The presence page's print button (no inline script: the page's Content-Security-Policy).
(function () {
  "use strict";
  var b = document.getElementById("print");
  if (b) b.addEventListener("click", function () { window.print(); });
})();
