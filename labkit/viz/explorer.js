(function () {
  var P = "__PREFIX__";
  var root = document.getElementById(P);
  if (!root || root.getAttribute("data-ready")) return;
  root.setAttribute("data-ready", "1");
  var D = JSON.parse(document.getElementById(P + "-data").textContent);
  var el = function (s) { return document.getElementById(P + "-" + s); };
  var exSel = el("example"), tySel = el("attention"), laIn = el("layer"),
      laVal = el("layer-value"), hdSel = el("head"), tkSel = el("token"),
      plot = el("plot"), legend = el("legend"), note = el("note");
  var NS = "http://www.w3.org/2000/svg";
  var V = ["#440154","#482475","#414487","#355f8d","#2a788e","#21918c","#22a884",
           "#44bf70","#7ad151","#bddf26","#fde725"];
  function hex(c) { return [1, 3, 5].map(function (i) { return parseInt(c.substr(i, 2), 16); }); }
  var VR = V.map(hex);
  function colour(t) {
    t = Math.max(0, Math.min(1, t)) * (VR.length - 1);
    var i = Math.min(Math.floor(t), VR.length - 2), f = t - i, a = VR[i], b = VR[i + 1];
    return "rgb(" + [0, 1, 2].map(function (j) { return Math.round(a[j] + f * (b[j] - a[j])); })
      .join(",") + ")";
  }
  function mk(tag, attrs, parent) {
    var n = document.createElementNS(NS, tag);
    for (var k in attrs) n.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(n);
    return n;
  }
  function typeInfo() {
    for (var i = 0; i < D.types.length; i++) if (D.types[i].key === tySel.value) return D.types[i];
    return D.types[0];
  }
  function current() { return D.examples[+exSel.value || 0].maps[tySel.value]; }
  function fillControls() {
    var t = typeInfo(), m = current();
    laIn.max = t.layers.length - 1;
    if (+laIn.value > t.layers.length - 1) laIn.value = 0;
    var head = hdSel.value, opts = '<option value="all">all heads</option>';
    for (var h = 0; h < t.heads; h++) opts += '<option value="' + h + '">head ' + h + "</option>";
    hdSel.innerHTML = opts;
    hdSel.value = (head === "all" || +head < t.heads) ? head : "all";
    var tok = tkSel.value, topts = '<option value="-1">none</option>';
    for (var q = 0; q < m.q.length; q++) {
      var s = document.createElement("span"); s.textContent = m.q[q];
      topts += '<option value="' + q + '">' + q + ": " + s.innerHTML + "</option>";
    }
    tkSel.innerHTML = topts;
    tkSel.value = (+tok < m.q.length) ? tok : "-1";
  }
  function matrix(li, h) { return current().w[li][h]; }
  function drawOne(svg, m, w, x0, y0, cs, vmax, labels, hl, head) {
    var nq = m.q.length, nk = m.k.length, g = mk("g", {"data-head": head}, svg);
    for (var i = 0; i < nq; i++) {
      for (var j = 0; j < nk; j++) {
        var v = w[i * nk + j] / 1000;
        var r = mk("rect", {x: x0 + j * cs, y: y0 + i * cs, width: cs, height: cs,
          fill: colour(v / vmax), "data-q": i, "data-k": j, "data-w": v.toFixed(3)}, g);
        if (hl >= 0 && i !== hl) r.setAttribute("opacity", "0.25");
        if (labels) mk("title", {}, r).textContent =
          m.q[i] + " \u2192 " + m.k[j] + ": " + v.toFixed(3);
      }
    }
    if (hl >= 0) mk("rect", {x: x0, y: y0 + hl * cs, width: nk * cs, height: cs, fill: "none",
      stroke: "#d00", "stroke-width": 2}, g);
    if (labels) {
      for (var a = 0; a < nq; a++) {
        var tq = mk("text", {x: x0 - 4, y: y0 + a * cs + cs * 0.7, "text-anchor": "end",
          "font-size": Math.min(12, cs), "font-family": "sans-serif",
          "font-weight": a === hl ? "bold" : "normal"}, g);
        tq.textContent = m.q[a];
      }
      for (var b = 0; b < nk; b++) {
        var xk = x0 + b * cs + cs * 0.7, tk = mk("text", {x: xk, y: y0 - 4,
          transform: "rotate(-60 " + xk + " " + (y0 - 4) + ")", "font-size": Math.min(12, cs),
          "font-family": "sans-serif"}, g);
        tk.textContent = m.k[b];
      }
    }
    return g;
  }
  function draw() {
    var t = typeInfo(), m = current(), li = +laIn.value, head = hdSel.value,
        hl = +tkSel.value, nq = m.q.length, nk = m.k.length;
    laVal.textContent = t.layers[li];
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("id", P + "-svg");
    svg.setAttribute("data-layer", t.layers[li]);
    svg.setAttribute("data-head", head);
    var vmax = 1e-3, h, w;
    if (head === "all") {
      for (h = 0; h < t.heads; h++) { w = matrix(li, h); for (var i = 0; i < w.length; i++)
        vmax = Math.max(vmax, w[i] / 1000); }
      var cs = Math.max(2, Math.min(10, Math.floor(180 / Math.max(nq, nk))));
      var cols = Math.min(t.heads, 4), pw = nk * cs + 16, ph = nq * cs + 22;
      svg.setAttribute("width", cols * pw);
      svg.setAttribute("height", Math.ceil(t.heads / cols) * ph);
      for (h = 0; h < t.heads; h++) {
        var x0 = (h % cols) * pw, y0 = Math.floor(h / cols) * ph + 16;
        var cap = mk("text", {x: x0, y: y0 - 4, "font-size": 11, "font-family": "sans-serif"}, svg);
        cap.textContent = "head " + h;
        var g = drawOne(svg, m, matrix(li, h), x0, y0, cs, vmax, false, hl, h);
        g.style.cursor = "pointer";
        g.addEventListener("click", (function (hh) { return function () {
          hdSel.value = String(hh); draw(); }; })(h));
      }
    } else {
      w = matrix(li, +head);
      for (var k = 0; k < w.length; k++) vmax = Math.max(vmax, w[k] / 1000);
      var longest = 1;
      m.q.forEach(function (s) { longest = Math.max(longest, s.length); });
      m.k.forEach(function (s) { longest = Math.max(longest, s.length); });
      var cs1 = Math.max(8, Math.min(24, Math.floor(520 / Math.max(nq, nk))));
      var left = Math.min(110, 8 + 7 * longest), top = Math.min(90, 8 + 6 * longest);
      svg.setAttribute("width", left + nk * cs1 + 10);
      svg.setAttribute("height", top + nq * cs1 + 10);
      drawOne(svg, m, w, left, top, cs1, vmax, true, hl, +head);
    }
    plot.innerHTML = "";
    plot.appendChild(svg);
    var bar = "";
    for (var s = 0; s <= 10; s++) {
      bar += '<span style="display:inline-block;width:14px;height:10px;background:' +
        colour(s / 10) + '"></span>';
    }
    legend.innerHTML = "0 " + bar + " " + vmax.toFixed(3) + " (" + t.label + ", layer " +
      t.layers[li] + ", " + (head === "all" ? "all heads, one scale" : "head " + head) +
      "; rows: queries, columns: keys)";
    note.textContent = D.notes.join("; ");
    root.setAttribute("data-example", exSel.value || "0");
    root.setAttribute("data-attention", t.key);
    root.setAttribute("data-layer", t.layers[li]);
    root.setAttribute("data-head", head);
    root.setAttribute("data-token", String(hl));
    root.setAttribute("data-draws", String(+root.getAttribute("data-draws") + 1));
  }
  function onStructure() { fillControls(); draw(); }
  exSel.addEventListener("change", onStructure);
  tySel.addEventListener("change", onStructure);
  laIn.addEventListener("input", draw);
  laIn.addEventListener("change", draw);
  hdSel.addEventListener("change", draw);
  tkSel.addEventListener("change", draw);
  fillControls();
  draw();
})();
