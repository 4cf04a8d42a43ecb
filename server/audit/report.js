// lakegate audit report: draws the plotly figures from their JSON blocks and filters the raw
// records table. Plain DOM, no framework; the page's CSP allows this script by its hash.
(function () {
  "use strict";

  document.querySelectorAll("[data-figure]").forEach(function (element) {
    var block = document.getElementById(element.getAttribute("data-figure"));
    var figure = JSON.parse(block.textContent);
    Plotly.newPlot(element, figure.data, figure.layout, { displaylogo: false, responsive: true });
  });

  var table = document.getElementById("table-records");
  if (!table) {
    return;
  }
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var fields = ["principal", "tool", "decision"];
  var inputs = fields.map(function (name) {
    return document.getElementById("filter-" + name);
  });
  var shown = document.getElementById("records-shown");

  function apply() {
    var wanted = inputs.map(function (input) {
      return input.value.trim().toLowerCase();
    });
    var visible = 0;
    rows.forEach(function (row) {
      var keep = fields.every(function (name, i) {
        var value = (row.getAttribute("data-" + name) || "").toLowerCase();
        return wanted[i] === "" || value.indexOf(wanted[i]) !== -1;
      });
      row.hidden = !keep;
      if (keep) {
        visible += 1;
      }
    });
    shown.textContent = String(visible);
  }

  inputs.forEach(function (input) {
    input.addEventListener("input", apply);
  });
  apply();
})();
