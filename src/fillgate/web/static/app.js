// fillgate dashboard: the throughput chart (uPlot) and the copy button. No inline scripts.
(function () {
  "use strict";

  function drawChart(el) {
    var src = el.getAttribute("data-src");
    var plot = null;
    var timer = null;
    function load() {
      fetch(src, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (d) {
          if (!d) { return; }
          if (d.x.length < 2) {
            el.textContent = d.x.length ? "" : "No batch committed yet.";
          } else {
            var rows = [d.x, d.rate];
            if (plot === null) {
              el.textContent = "";
              plot = new uPlot({
                width: Math.max(el.clientWidth, 300), height: 180,
                scales: { x: { time: false } },
                axes: [{ label: "seconds since the first batch" }, { label: "rows/s", size: 80 }],
                series: [{ label: "s" }, { label: "rows/s per batch", stroke: "#2563eb", width: 2, fill: "rgba(37,99,235,0.08)" }]
              }, rows, el);
            } else {
              plot.setData(rows);
            }
          }
          if (d.live && timer === null) { timer = setInterval(load, 2000); }
          if (!d.live && timer !== null) { clearInterval(timer); timer = null; }
        })
        .catch(function () { /* the next poll tries again */ });
    }
    load();
  }

  function init() {
    var chart = document.getElementById("throughput");
    if (chart && window.uPlot) { drawChart(chart); }
    document.addEventListener("click", function (ev) {
      var button = ev.target.closest("[data-copy]");
      if (!button) { return; }
      var source = document.querySelector(button.getAttribute("data-copy"));
      if (!source) { return; }
      var text = source.textContent;
      function done() { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 1500); }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done);
      } else {
        var range = document.createRange();
        range.selectNodeContents(source);
        var sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        done();
      }
    });
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); } else { init(); }
})();
