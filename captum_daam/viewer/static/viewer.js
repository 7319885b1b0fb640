/* captum-daam viewer: the summary, gallery and example pages of a report.
 * Data arrive as scripts calling DAAMView.receive(key, value), so that a report opened
 * from disk (file://) can load them; nothing is fetched from the network. */
(function () {
  "use strict";

  var received = {};   // key -> value
  var waiting = {};    // key -> [callbacks]
  var summary = null;  // the store's description (data/summary.js)
  var table = null;    // one column per field over the shown examples (data/table.js)
  var position = {};   // example index -> row of the table
  var labelled = false;  // whether any example has a label
  var player = null;   // the play button's timer
  var keys = null;     // the example page's keyboard handler
  var playButton = null;
  var shownPage = 0;   // counts the pages shown: a page still loading when left draws nothing
  var PAGE = 60;       // gallery cards per page
  var TINY = 1.1754943508222875e-38;  // float32's smallest normal, as decompose clamps with

  function receive(key, value) {
    received[key] = value;
    (waiting[key] || []).forEach(function (callers) { callers[0](value); });
    delete waiting[key];
  }

  function load(key, src) {
    if (key in received) return Promise.resolve(received[key]);
    return new Promise(function (resolve, reject) {
      var first = !(key in waiting);
      (waiting[key] = waiting[key] || []).push([resolve, reject]);
      if (!first) return;
      var script = document.createElement("script");
      script.src = src;
      script.onerror = function () {  // every caller hears it; the next load tries again
        var callers = waiting[key] || [];
        delete waiting[key];
        script.remove();
        callers.forEach(function (pair) { pair[1](new Error("could not load " + src)); });
      };
      document.head.appendChild(script);
    });
  }

  function pad(number) { return String(number).padStart(5, "0"); }
  function groupOf(index) { return Math.floor(index / summary.group_size); }
  function mapsOf(index) {
    var group = groupOf(index);
    return load("maps/" + group, "data/maps/" + pad(group) + ".js").then(function (value) {
      return value.examples[String(index)];
    });
  }
  function imageUrl(index) {
    var inline = received["images/" + groupOf(index)];
    if (inline) return inline[String(index)] || null;
    return summary.images ? "images/" + pad(groupOf(index)) + "/" + index + ".jpg" : null;
  }

  // ---- numbers and names -----------------------------------------------------------------

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return Number(value).toFixed(digits === undefined ? 3 : digits);
  }
  // the labels' names (summary.classes) name the model's classes only where the labels are
  // the model's classes; a prediction or a target is otherwise shown as its index
  function className(index, isLabel) {
    if (index === null || index === undefined || index < 0) return "–";
    var name = isLabel || summary.labels_are_classes ? summary.classes[String(index)] : null;
    return name ? name + " (" + index + ")" : String(index);
  }
  // the model's block number of the l-th map (1-based): explain --blocks 9-12 shows 9..12
  function blockName(l) { return summary.block_numbers ? summary.block_numbers[l - 1] : l; }
  function shortName(index, isLabel) {
    return (isLabel || summary.labels_are_classes ? summary.classes[String(index)] : null) || String(index);
  }
  function labelKnown(row) { return table.label[row] >= 0; }
  // the gallery's classes: the labels where the dataset has any, else the explained classes
  function classOf(row) { return labelled ? table.label[row] : table.target[row]; }
  function correct(row) {
    if (!summary.labels_are_classes || !labelKnown(row)) return null;
    return table.prediction[row] === table.label[row];
  }
  function el(tag, attributes, children) {
    var node = document.createElement(tag);
    Object.keys(attributes || {}).forEach(function (key) {
      if (key === "text") node.textContent = attributes[key];  // text is never parsed as HTML
      else node.setAttribute(key, attributes[key]);
    });
    (children || []).forEach(function (child) { if (child) node.appendChild(child); });
    return node;
  }
  function svgEl(tag, attributes) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attributes || {}).forEach(function (key) { node.setAttribute(key, attributes[key]); });
    return node;
  }

  // ---- maps: decoding and the display scalings of captum_daam.decompose ---------------------

  function halfToFloat(bits) {
    var sign = bits & 0x8000 ? -1 : 1;
    var exponent = (bits >> 10) & 0x1f;
    var fraction = bits & 0x3ff;
    if (exponent === 0) return sign * Math.pow(2, -14) * (fraction / 1024);
    if (exponent === 31) return fraction ? NaN : sign * Infinity;
    return sign * Math.pow(2, exponent - 15) * (1 + fraction / 1024);
  }

  function decode(entry) {
    if (!entry.values) {
      var text = atob(entry.data);
      var values = new Float64Array(text.length / 2);
      for (var i = 0; i < values.length; i++) {
        values[i] = halfToFloat(text.charCodeAt(2 * i) | (text.charCodeAt(2 * i + 1) << 8));
      }
      entry.values = values;
    }
    return entry.values;
  }

  // D_1..D_L as stored, or the block maps cam_l = D_l - D_(l-1)
  function sequence(values, blocks, size, mode) {
    if (mode !== "block") return values;
    var out = new Float64Array(values.length);
    for (var l = 0; l < blocks; l++) {
      for (var k = 0; k < size; k++) {
        out[l * size + k] = values[l * size + k] - (l ? values[(l - 1) * size + k] : 0);
      }
    }
    return out;
  }

  function minMaxInto(source, out, start, stop) {
    var low = Infinity, high = -Infinity, i;
    for (i = start; i < stop; i++) {
      if (Number.isFinite(source[i])) { low = Math.min(low, source[i]); high = Math.max(high, source[i]); }
    }
    var span = Math.max(high - low, TINY);
    for (i = start; i < stop; i++) out[i] = (source[i] - low) / span;
  }

  // scale_flow(flow, scaling) of captum_daam.decompose, for one example's (L, h, w) maps
  function scale(values, blocks, size, scaling) {
    var out = new Float64Array(values.length), l;
    if (scaling === "shared") {
      minMaxInto(values, out, 0, values.length);
      return out;
    }
    var source = values;
    if (scaling === "paper") {
      var lastMax = -Infinity;
      for (var k = (blocks - 1) * size; k < blocks * size; k++) lastMax = Math.max(lastMax, values[k]);
      lastMax = Math.max(lastMax, TINY);
      source = new Float64Array(values.length);
      for (var i = 0; i < values.length; i++) {
        source[i] = 1 / (1 + Math.exp(-5 * values[i] / lastMax)) - 0.5;
      }
    }
    for (l = 0; l < blocks; l++) minMaxInto(source, out, l * size, (l + 1) * size);
    return out;
  }

  function paint(canvas, picture, values, height, width, alpha) {
    var context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (picture) context.drawImage(picture, 0, 0, canvas.width, canvas.height);
    var small = document.createElement("canvas");
    small.width = width;
    small.height = height;
    var smallContext = small.getContext("2d");
    var pixels = smallContext.createImageData(width, height);
    for (var k = 0; k < height * width; k++) {
      var value = values[k] >= 0 ? Math.min(1, values[k]) : 0;  // NaN as 0
      var colour = summary.colormap[Math.min(255, Math.floor(value * 256))];
      pixels.data[4 * k] = colour[0];
      pixels.data[4 * k + 1] = colour[1];
      pixels.data[4 * k + 2] = colour[2];
      pixels.data[4 * k + 3] = 255;
    }
    smallContext.putImageData(pixels, 0, 0);
    context.imageSmoothingEnabled = true;
    context.globalAlpha = picture ? alpha : 1;
    context.drawImage(small, 0, 0, canvas.width, canvas.height);
    context.globalAlpha = 1;
  }

  // ---- pages -----------------------------------------------------------------------------

  function setPage(name) {
    stopPlaying();
    keys = null;
    playButton = null;
    shownPage += 1;
    ["summary", "gallery"].forEach(function (page) {
      var link = document.getElementById("nav-" + page);
      if (link) link.className = page === name ? "active" : "";
    });
    var app = document.getElementById("app");
    app.innerHTML = "";
    app.setAttribute("data-page", name);
    return app;
  }

  function hashParams() {
    var parts = location.hash.replace(/^#/, "").split("?");
    return { path: parts[0].split("/").filter(Boolean), params: new URLSearchParams(parts[1] || "") };
  }

  function route() {
    var where = hashParams();
    var page;
    if (where.path[0] === "gallery") page = gallery(where.params);
    else if (where.path[0] === "example") page = example(Number(where.path[1]), where.params);
    else if (summary.kind === "explain") page = example(table.index[0], where.params);
    else page = overview();
    Promise.resolve(page).catch(function (error) {
      var app = document.getElementById("app");
      app.appendChild(el("p", { "class": "error", text: String(error.message || error) }));
    });
  }

  // The summary page ------------------------------------------------------------------------

  function overview() {
    var app = setPage("summary");
    var facts = el("div", { "class": "facts" });
    function fact(name, value, id) {
      facts.appendChild(el("div", { "class": "fact", id: id || "" }, [
        el("div", { "class": "fact-name", text: name }), el("div", { "class": "fact-value", text: value })]));
    }
    fact("examples", summary.shown + (summary.partial ? " of " + summary.examples : ""), "fact-examples");
    fact("accuracy", summary.accuracy === null ? "–" : fmt(100 * summary.accuracy, 1) + " %", "fact-accuracy");
    fact("model", summary.model || "–");
    fact("dataset", summary.dataset || "–");
    fact("methods", summary.methods.map(function (m) { return m.name; }).join(", "));
    app.appendChild(facts);
    if (summary.labels_meaning) app.appendChild(el("p", { "class": "note", text: "Labels: " + summary.labels_meaning }));

    var links = el("p", { "class": "shortcuts" });
    links.appendChild(el("a", { href: "#/gallery?failures=1", text: "Failures first" }));
    if (summary.labels_are_classes) links.appendChild(el("a", { href: "#/gallery?outcome=wrong", text: "Wrong predictions" }));
    links.appendChild(el("a", { href: "#/gallery?sort=score&order=asc", text: "Least confident" }));
    app.appendChild(links);

    var metricsPlace = el("div", { id: "metrics" });
    app.appendChild(metricsPlace);
    if (summary.metrics.length) {
      metricsPlace.appendChild(el("p", { "class": "loading", text: "Loading the metrics' intervals…" }));
      load("stats", "data/stats.js").then(function (stats) { metricTable(metricsPlace, stats); },
        function (error) { metricsPlace.textContent = error.message; });
    }
    if (summary.score_histogram) {
      app.appendChild(el("h2", { text: "Scores of the explained classes" }));
      app.appendChild(histogram(summary.score_histogram, 360, 80, true));
    }
    Object.keys(summary.flow_mass).forEach(function (name) {
      app.appendChild(el("h2", { text: name + ": how the decision forms, block by block" }));
      app.appendChild(el("p", { "class": "note", text: "The mean share of the final map's mass " +
        "that each accumulated map D_l holds, over the " + summary.shown + " examples." }));
      app.appendChild(lineChart(summary.flow_mass[name], name));
      Object.keys((summary.block_metrics || {})[name] || {}).forEach(function (metric) {
        app.appendChild(el("p", { "class": "note", text: "The mean " + metric + " of each accumulated map D_l:" }));
        app.appendChild(lineChart(summary.block_metrics[name][metric], name + "/" + metric));
      });
    });
  }

  // each method's metrics: mean, bootstrap interval and histogram (data/stats.js)
  function metricTable(place, stats) {
    place.innerHTML = "";
    place.appendChild(el("h2", { text: "Metrics (mean and " + Math.round(100 * summary.confidence) +
      " % bootstrap interval over the examples, " + summary.resamples + " resamples)" }));
    var grid = el("table", { "class": "metrics", id: "metric-table" });
    var head = el("tr", {}, [el("th", { text: "method" })]);
    summary.metrics.forEach(function (metric) {
      var lower = summary.lower_is_better.indexOf(metric) >= 0;
      head.appendChild(el("th", { text: metric + (lower ? " ↓" : " ↑"),
        title: lower ? "lower is better" : "higher is better" }));
    });
    grid.appendChild(head);
    summary.methods.forEach(function (method) {
      var row = el("tr", {}, [el("td", { text: method.name })]);
      summary.metrics.forEach(function (metric) {
        var stat = (stats[method.name] || {})[metric];
        var cell = el("td", { "data-method": method.name, "data-metric": metric });
        if (stat && stat.mean !== null) {
          cell.appendChild(el("div", { "class": "mean", text: fmt(stat.mean) }));
          cell.appendChild(el("div", { "class": "interval", text: "[" + fmt(stat.low) + ", " + fmt(stat.high) + "]" }));
          cell.appendChild(histogram(stat.histogram, 120, 34));
        } else {
          cell.textContent = "–";
        }
        row.appendChild(cell);
      });
      grid.appendChild(row);
    });
    place.appendChild(grid);
  }

  function histogram(data, width, height, axis) {
    var svg = svgEl("svg", { width: width, height: height + (axis ? 16 : 0), "class": "histogram" });
    if (!data) return svg;
    var most = Math.max.apply(null, data.counts.concat([1]));
    var bar = width / data.counts.length;
    data.counts.forEach(function (count, i) {
      var h = Math.round(height * count / most);
      var rect = svgEl("rect", { x: i * bar + 0.5, y: height - h, width: Math.max(1, bar - 1), height: h });
      var title = svgEl("title");
      title.textContent = fmt(data.edges[i]) + " – " + fmt(data.edges[i + 1]) + ": " + count;
      rect.appendChild(title);
      svg.appendChild(rect);
    });
    if (axis) {
      [0, data.counts.length].forEach(function (i) {
        var text = svgEl("text", { x: i ? width - 2 : 2, y: height + 13, "text-anchor": i ? "end" : "start" });
        text.textContent = fmt(data.edges[i], 2);
        svg.appendChild(text);
      });
    }
    return svg;
  }

  function lineChart(values, name) {
    var width = 460, height = 200, left = 36, bottom = 24, top = 8, right = 10;
    var svg = svgEl("svg", { width: width, height: height, "class": "line-chart", "data-method": name });
    var most = Math.max.apply(null, values.filter(function (v) { return v !== null; }).concat([1]));
    function x(i) { return left + (values.length > 1 ? i * (width - left - right) / (values.length - 1) : 0); }
    function y(v) { return top + (height - top - bottom) * (1 - v / most); }
    svg.appendChild(svgEl("line", { x1: left, y1: y(0), x2: width - right, y2: y(0), "class": "axis" }));
    svg.appendChild(svgEl("line", { x1: left, y1: top, x2: left, y2: y(0), "class": "axis" }));
    [0, most].forEach(function (v) {
      var label = svgEl("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end" });
      label.textContent = fmt(v, 2);
      svg.appendChild(label);
    });
    svg.appendChild(svgEl("polyline", { points: values.map(function (v, i) { return v === null ? null : x(i) + "," + y(v); })
      .filter(function (point) { return point !== null; }).join(" ") }));
    values.forEach(function (v, i) {
      if (v === null) return;  // no value for this block (NaN)
      var dot = svgEl("circle", { cx: x(i), cy: y(v), r: 3 });
      var title = svgEl("title");
      title.textContent = "D_" + (i + 1) + ": " + fmt(v);
      dot.appendChild(title);
      svg.appendChild(dot);
      var label = svgEl("text", { x: x(i), y: height - 6, "text-anchor": "middle" });
      label.textContent = String(i + 1);
      svg.appendChild(label);
    });
    return svg;
  }

  // The gallery -----------------------------------------------------------------------------

  function columns() {
    var list = [{ key: "index", name: "index" }, { key: "score", name: "score" }];
    summary.methods.forEach(function (method) {
      summary.metrics.forEach(function (metric) {
        list.push({ key: method.name + "/" + metric, name: (summary.methods.length > 1 ? method.name + ": " : "") + metric });
      });
    });
    return list;
  }
  function valueOf(key, row) {
    if (key === "index") return table.index[row];
    if (key === "score") return table.score[row];
    var cut = key.lastIndexOf("/");
    var values = (table.metrics[key.slice(0, cut)] || {})[key.slice(cut + 1)];
    return values ? values[row] : null;
  }
  // the method failures are judged by: the first with a flow (DAAM), else the first
  function leadMethod() {
    return (summary.methods.filter(function (m) { return m.flow; })[0] || summary.methods[0]).name;
  }
  function failureMetric() {
    return summary.metrics.indexOf("pointing_game") >= 0 ? leadMethod() + "/pointing_game" : null;
  }
  // a failure: the lead method's pointing missed on a correct prediction (right for the wrong
  // reason); where the store has no pointing game, a wrong prediction
  function isFailure(row) {
    var pointing = failureMetric();
    if (pointing !== null) return correct(row) === true && valueOf(pointing, row) === 0;
    return correct(row) === false;
  }

  function selectRows(params) {
    var cls = params.get("class"), outcome = params.get("outcome");
    var low = params.get("min"), high = params.get("max");
    var where = params.get("where"), op = params.get("op") || "lt", bound = params.get("value");
    var rows = [];
    for (var row = 0; row < table.index.length; row++) {
      if (cls !== null && cls !== "" && classOf(row) !== Number(cls)) continue;
      if (outcome === "correct" && correct(row) !== true) continue;
      if (outcome === "wrong" && correct(row) !== false) continue;
      if (low !== null && low !== "" && !(table.score[row] >= Number(low))) continue;
      if (high !== null && high !== "" && !(table.score[row] <= Number(high))) continue;
      if (where && bound !== null && bound !== "") {
        var v = valueOf(where, row);
        if (v === null || (op === "lt" ? !(v < Number(bound)) : !(v >= Number(bound)))) continue;
      }
      rows.push(row);
    }
    var key = params.get("sort") || "index";
    var sign = params.get("order") === "desc" ? -1 : 1;
    var failures = params.get("failures") === "1";
    rows.sort(function (a, b) {
      if (failures) {
        var fa = isFailure(a) ? 0 : 1, fb = isFailure(b) ? 0 : 1;
        if (fa !== fb) return fa - fb;
      }
      var va = valueOf(key, a), vb = valueOf(key, b);
      if (va === null && vb === null) return table.index[a] - table.index[b];
      if (va === null) return 1;  // missing values last, in both orders
      if (vb === null) return -1;
      return (va - vb) * sign || table.index[a] - table.index[b];
    });
    return rows;
  }

  function gallery(params) {
    var app = setPage("gallery");
    var controls = el("form", { "class": "controls", id: "gallery-controls" });
    function control(label, input) {
      controls.appendChild(el("label", {}, [el("span", { text: label }), input]));
      return input;
    }
    function select(name, options, value) {
      var node = el("select", { name: name, id: "control-" + name });
      options.forEach(function (option) {
        var item = el("option", { value: option[0], text: option[1] });
        if (String(option[0]) === String(value || "")) item.selected = true;
        node.appendChild(item);
      });
      return node;
    }
    var byLabel = labelled;
    var classes = {};
    for (var row = 0; row < table.index.length; row++) if (classOf(row) >= 0) classes[classOf(row)] = true;
    var classOptions = [["", "all"]].concat(Object.keys(classes).map(Number).sort(function (a, b) { return a - b; })
      .map(function (c) { return [c, className(c, byLabel)]; }));
    control(byLabel ? "class (label)" : "class (target)",
      select("class", classOptions, params.get("class")));
    if (summary.labels_are_classes) {
      control("outcome", select("outcome", [["", "all"], ["correct", "correct"], ["wrong", "wrong"]], params.get("outcome")));
    }
    control("score ≥", el("input", { name: "min", id: "control-min", type: "number", step: "0.05", min: 0, max: 1, value: params.get("min") || "" }));
    control("score ≤", el("input", { name: "max", id: "control-max", type: "number", step: "0.05", min: 0, max: 1, value: params.get("max") || "" }));
    var metricColumns = columns().slice(2);
    if (metricColumns.length) {
      control("where", select("where", [["", "no metric filter"]].concat(metricColumns.map(function (c) { return [c.key, c.name]; })), params.get("where")));
      control("is", select("op", [["lt", "<"], ["ge", "≥"]], params.get("op")));
      control("value", el("input", { name: "value", id: "control-value", type: "number", step: "any", value: params.get("value") || "" }));
    }
    control("sort by", select("sort", columns().map(function (c) { return [c.key, c.name]; }), params.get("sort")));
    control("order", select("order", [["asc", "ascending"], ["desc", "descending"]], params.get("order")));
    var failures = el("input", { type: "checkbox", name: "failures", id: "control-failures", value: "1" });
    failures.checked = params.get("failures") === "1";
    control(failureMetric() ? "failures first (" + leadMethod() + "'s pointing missed on a correct prediction)"
      : "failures first (wrong predictions)", failures);
    controls.addEventListener("change", function () {
      var next = new URLSearchParams();
      new FormData(controls).forEach(function (value, key) { if (value !== "") next.set(key, value); });
      if (!next.get("where")) next.delete("op");
      location.hash = "#/gallery?" + next.toString();
    });
    controls.addEventListener("submit", function (event) { event.preventDefault(); });
    app.appendChild(controls);

    var rows = selectRows(params);
    var pages = Math.max(1, Math.ceil(rows.length / PAGE));
    var page = Math.min(pages - 1, Math.max(0, parseInt(params.get("page"), 10) || 0));
    var sortKey = params.get("sort") || "index";
    var info = el("p", { "class": "count", id: "gallery-count",
      text: rows.length + " of " + table.index.length + " examples" + (pages > 1 ? " · page " + (page + 1) + " of " + pages : "") });
    app.appendChild(info);
    var grid = el("div", { "class": "gallery", id: "gallery" });
    rows.slice(page * PAGE, (page + 1) * PAGE).forEach(function (row) {
      var index = table.index[row];
      var card = el("a", { "class": "card", href: "#/example/" + index + "?from=" + encodeURIComponent(location.hash), "data-index": index });
      var url = imageUrl(index);
      card.appendChild(url ? el("img", { src: url, loading: "lazy", alt: "example " + index }) : el("div", { "class": "no-image", text: "#" + index }));
      var verdict = correct(row);
      var caption = el("div", { "class": "caption" });
      caption.appendChild(el("div", { text: "#" + index + (verdict === null ? "" : verdict ? " ✓" : " ✗"),
        "class": verdict === false ? "wrong" : "" }));
      var classes = verdict === true ? shortName(table.label[row], true)
        : (labelKnown(row) ? shortName(table.label[row], true) + " → " : "") + shortName(table.prediction[row]);
      caption.appendChild(el("div", { "class": "small", text: classes, title: "label → prediction" }));
      var shown = sortKey === "index" || sortKey === "score" ? "p " + fmt(table.score[row], 2) : fmt(valueOf(sortKey, row), 3) + " · p " + fmt(table.score[row], 2);
      caption.appendChild(el("div", { "class": "small value", text: shown }));
      card.appendChild(caption);
      grid.appendChild(card);
    });
    app.appendChild(grid);
    app.setAttribute("data-query", params.toString());  // the gallery shown is this query's
    if (pages > 1) {
      var pager = el("div", { "class": "pager" });
      [["previous", page - 1], ["next", page + 1]].forEach(function (item) {
        var next = new URLSearchParams(params);
        next.set("page", item[1]);
        var link = el("a", { id: "page-" + item[0], href: "#/gallery?" + next.toString(), text: item[0] });
        if (item[1] < 0 || item[1] >= pages) link.className = "disabled";
        pager.appendChild(link);
      });
      app.appendChild(pager);
    }
  }

  // The example page ------------------------------------------------------------------------

  function blocksHint(blocks) {
    var hints = [];
    if (blocks > 1) hints.push("← → block", "space play");
    if (table.index.length > 1) hints.push("[ ] previous / next example");
    return hints.length ? "  keys: " + hints.join(", ") : "";
  }

  function stopPlaying() {
    if (player !== null) { clearInterval(player); player = null; }
    if (playButton) playButton.textContent = "▶ play";
  }

  function example(index, params) {
    var app = setPage("example");
    var row = position[index];
    if (row === undefined) {
      app.appendChild(el("p", { "class": "error", text: "Example " + index + " is not in this report." }));
      return null;
    }
    var blocks = Math.max.apply(null, summary.methods.map(function (m) { return m.blocks; }));
    var state = {
      block: Math.min(blocks, Math.max(1, parseInt(params.get("block"), 10) || blocks)),
      scaling: params.get("scaling") || "paper",
      mode: params.get("mode") || "flow",
      alpha: Math.min(1, Math.max(0, parseFloat(params.get("alpha")))) || 0.5,
      image: params.get("image") !== "0"
    };
    var verdict = correct(row);
    var title = "Example #" + index;
    if (summary.kind === "explain" && summary.names) title = summary.names[index];
    var head = el("div", { "class": "example-head" }, [el("h2", { id: "example-title", "data-index": index, text: title })]);
    var facts = [];
    if (labelKnown(row)) facts.push("label " + className(table.label[row], true));
    facts.push("explained " + className(table.target[row]) + " (p " + fmt(table.score[row], 3) + ")");
    if (summary.kind !== "explain") facts.push("predicted " + className(table.prediction[row]));
    if (verdict !== null) facts.push(verdict ? "correct" : "wrong");
    head.appendChild(el("p", { "class": "facts-line" + (verdict === false ? " wrong" : ""), text: facts.join(" · ") }));
    // previous and next in the order of the gallery the example was opened from
    var from = params.get("from");
    if (from && from.indexOf("#/gallery") !== 0) from = null;  // only a gallery of this report
    var order = from ? selectRows(new URLSearchParams(from.split("?")[1] || "")) : null;
    var at = order ? order.indexOf(row) : -1;
    if (at < 0) { order = table.index.map(function (_, r) { return r; }); at = row; }
    var step = el("p", { "class": "steps" });
    [["previous", at - 1], ["next", at + 1]].forEach(function (item) {
      if (item[1] >= 0 && item[1] < order.length) {
        step.appendChild(el("a", { id: "example-" + item[0], text: item[0],
          href: "#/example/" + table.index[order[item[1]]] + (from ? "?from=" + encodeURIComponent(from) : "") }));
      }
    });
    if (from) step.appendChild(el("a", { id: "example-back", href: from, text: "back to the gallery" }));
    step.appendChild(el("span", { "class": "small", text: blocksHint(blocks) }));
    head.appendChild(step);
    app.appendChild(head);

    var controls = el("div", { "class": "controls viewer-controls" });
    var play = el("button", { id: "play", type: "button", text: "▶ play" });
    var slider = el("input", { id: "block-slider", type: "range", min: 1, max: blocks, step: 1, value: state.block });
    var blockLabel = el("span", { id: "block-label" });
    var mode = el("select", { id: "mode" }, [el("option", { value: "flow", text: "D_l: accumulated (the flow)" }),
      el("option", { value: "block", text: "cam_l: block map" })]);
    mode.value = state.mode;
    var scaling = el("select", { id: "scaling" }, [el("option", { value: "paper", text: "paper's mapping" }),
      el("option", { value: "shared", text: "one range for the flow" }), el("option", { value: "per_map", text: "each map its own range" })]);
    scaling.value = state.scaling;
    var alpha = el("input", { id: "alpha", type: "range", min: 0, max: 1, step: 0.05, value: state.alpha });
    var showImage = el("input", { id: "show-image", type: "checkbox" });
    showImage.checked = state.image;
    if (blocks > 1) {
      controls.appendChild(play);
      controls.appendChild(el("label", {}, [el("span", { text: "block" }), slider, blockLabel]));
      controls.appendChild(el("label", {}, [el("span", { text: "map" }), mode]));
    }
    controls.appendChild(el("label", {}, [el("span", { text: "scaling" }), scaling]));
    controls.appendChild(el("label", {}, [el("span", { text: "opacity" }), alpha]));
    controls.appendChild(el("label", {}, [el("span", { text: "image" }), showImage]));
    app.appendChild(controls);

    var panels = el("div", { "class": "panels", id: "panels" });
    app.appendChild(panels);
    var strip = el("div", { "class": "strip", id: "strip" });
    app.appendChild(strip);

    var picture = null;
    var url = imageUrl(index);
    var pictureReady = url ? new Promise(function (resolve) {
      var img = new Image();
      img.onload = function () { picture = img; resolve(); };
      img.onerror = function () { resolve(); };
      img.src = url;
    }) : Promise.resolve();

    var thisPage = shownPage;
    return Promise.all([mapsOf(index), pictureReady]).then(function (results) {
      if (thisPage !== shownPage) return;  // left while loading
      playButton = play;
      var entries = results[0] || {};
      var views = [];
      var aspect = picture ? picture.naturalWidth / picture.naturalHeight : null;
      summary.methods.forEach(function (method) {
        var entry = entries[method.name];
        if (!entry) return;
        var shape = entry.shape, size = shape[1] * shape[2];
        var ratio = aspect || shape[2] / shape[1];
        var canvas = el("canvas", { "class": "map", "data-method": method.name });
        canvas.width = ratio >= 1 ? 256 : Math.round(256 * ratio);
        canvas.height = ratio >= 1 ? Math.round(256 / ratio) : 256;
        var metricsLine = summary.metrics.map(function (metric) {
          var values = (table.metrics[method.name] || {})[metric];
          return metric + " " + fmt(values ? values[row] : null);
        }).join(" · ");
        var caption = el("figcaption", {}, [el("strong", { text: method.name }),
          el("span", { "class": "map-block", text: "" }), el("div", { "class": "small", text: metricsLine })]);
        panels.appendChild(el("figure", { "class": "panel" }, [canvas, caption]));
        views.push({ method: method, entry: entry, canvas: canvas, size: size, shape: shape, caption: caption });
      });
      if (!views.length) {
        panels.appendChild(el("p", { "class": "error", text: "No maps for example " + index + " in this report." }));
        return;
      }
      if (!picture) panels.appendChild(el("p", { "class": "note", text: "This store holds no image of the example; the maps are shown alone." }));
      var lead = views.filter(function (view) { return view.shape[0] > 1; })[0] || views[0];
      var stripCanvases = [];
      if (lead.shape[0] > 1) {
        for (var l = 0; l < lead.shape[0]; l++) {
          var small = el("canvas", { "class": "strip-map", "data-block": l + 1, title: "block " + blockName(l + 1) });
          small.width = Math.round(96 * lead.canvas.width / lead.canvas.height);
          small.height = 96;
          (function (block) {
            small.addEventListener("click", function () { stopPlaying(); state.block = block; slider.value = block; draw(); });
          })(l + 1);
          strip.appendChild(el("figure", {}, [small, el("figcaption", { text: String(blockName(l + 1)) })]));
          stripCanvases.push(small);
        }
      }

      function draw() {
        blockLabel.textContent = summary.block_numbers ? "block " + blockName(state.block) + " (" + state.block + " of " + blocks + ")"
          : state.block + " of " + blocks;
        DAAMView.shown = { index: index, block: state.block, scaling: state.scaling, mode: state.mode, maps: {} };
        DAAMView.drawn.push(state.block);
        views.forEach(function (view) {
          var count = view.shape[0];
          var scaled = scale(sequence(decode(view.entry), count, view.size, state.mode), count, view.size, state.scaling);
          var block = count > 1 ? Math.min(state.block, count) : 1;
          var values = scaled.subarray((block - 1) * view.size, block * view.size);
          paint(view.canvas, state.image ? picture : null, values, view.shape[1], view.shape[2], state.alpha);
          view.canvas.setAttribute("data-block", block);
          view.caption.querySelector(".map-block").textContent = count > 1
            ? "  " + (state.mode === "block" ? "cam_" : "D_") + blockName(block) : "  final map";
          DAAMView.shown.maps[view.method.name] = { block: block, blocks: count, values: Array.from(values) };
        });
        if (stripCanvases.length) {
          var count = lead.shape[0];
          var scaled = scale(sequence(decode(lead.entry), count, lead.size, state.mode), count, lead.size, state.scaling);
          stripCanvases.forEach(function (small, l) {
            paint(small, state.image ? picture : null, scaled.subarray(l * lead.size, (l + 1) * lead.size), lead.shape[1], lead.shape[2], state.alpha);
            small.parentNode.className = l + 1 === state.block ? "current" : "";
          });
        }
        document.getElementById("app").setAttribute("data-drawn", index + ":" + state.block + ":" + state.scaling + ":" + state.mode);
      }

      slider.addEventListener("input", function () { stopPlaying(); state.block = Number(slider.value); draw(); });
      mode.addEventListener("change", function () { state.mode = mode.value; draw(); });
      scaling.addEventListener("change", function () { state.scaling = scaling.value; draw(); });
      alpha.addEventListener("input", function () { state.alpha = Number(alpha.value); draw(); });
      showImage.addEventListener("change", function () { state.image = showImage.checked; draw(); });
      keys = function (event) {
        if ((event.key === "ArrowRight" || event.key === "ArrowLeft") && blocks > 1) {
          stopPlaying();
          state.block = Math.min(blocks, Math.max(1, state.block + (event.key === "ArrowRight" ? 1 : -1)));
          slider.value = state.block;
          draw();
        } else if (event.key === " " && blocks > 1) {
          play.click();
        } else if (event.key === "[" || event.key === "]") {
          var link = document.getElementById(event.key === "[" ? "example-previous" : "example-next");
          if (link) location.hash = link.getAttribute("href");
        } else {
          return;
        }
        event.preventDefault();
      };
      play.addEventListener("click", function () {
        if (player !== null) { stopPlaying(); return; }
        play.textContent = "❚❚ pause";
        if (state.block >= blocks) state.block = 0;
        player = setInterval(function () {
          state.block = Math.min(blocks, state.block + 1);
          if (state.block === blocks) stopPlaying();
          slider.value = state.block;
          draw();
        }, 500);
        state.block = Math.max(1, state.block);
        slider.value = state.block;
        draw();
      });
      draw();
    });
  }

  // ---- start -------------------------------------------------------------------------------

  function start() {
    Promise.all([load("summary", "data/summary.js"), load("table", "data/table.js")]).then(function (values) {
      summary = values[0];
      table = values[1];
      table.index.forEach(function (index, row) { position[index] = row; });
      labelled = table.label.some(function (label) { return label >= 0; });
      document.getElementById("title").textContent = summary.title + (summary.kind === "compare" ? " · comparison" : "");
      document.title = summary.title + " · captum-daam view";
      if (summary.kind === "explain") document.getElementById("nav-summary").hidden = true;
      if (summary.kind === "explain" && table.index.length === 1) document.getElementById("bar").hidden = true;
      if (summary.partial) {
        var notice = document.getElementById("notice");
        notice.hidden = false;
        notice.textContent = "Partial store: " + summary.shown + " of " + summary.examples + " examples (" +
          summary.chunks[0] + " of " + summary.chunks[1] + " chunks) are complete; these pages show those. " +
          "Run the command again to finish it, then view it again.";
      }
      window.addEventListener("hashchange", route);
      document.addEventListener("keydown", function (event) {
        var typing = event.target && event.target.matches && event.target.matches("input[type=number], select, textarea");
        if (keys && !typing && !event.ctrlKey && !event.metaKey && !event.altKey) keys(event);
      });
      route();
    }).catch(function (error) {
      document.getElementById("app").innerHTML = "";
      document.getElementById("app").appendChild(el("p", { "class": "error", text: "Could not load the report: " + error.message }));
    });
  }

  // shown and drawn: what the example page drew last, and the blocks it drew (for tests)
  window.DAAMView = { receive: receive, start: start, shown: null, drawn: [] };
})();
