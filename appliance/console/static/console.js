// The console's few scripts (the CSP allows no inline script): copy buttons, uploads with a
// progress bar, the playground's model/endpoint choices and streaming, the usage charts.
"use strict";

(function () {
  function csrf() {
    var field = document.querySelector("input[name=csrf]");
    return field ? field.value : "";
  }

  // ---- copy buttons: data-copy="#selector" ---------------------------------------------
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy"));
    if (!source) return;
    var text = "value" in source ? source.value : source.textContent;
    var note = button.parentElement.querySelector(".copied");
    function done(ok) {
      if (note) note.textContent = ok ? "Copied." : "Select the text and copy it.";
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(false); });
    } else {
      // Plain http to a remote host has no clipboard API: select the text instead.
      if (source.select) source.select();
      done(false);
    }
  });

  // ---- uploads: <form data-upload=URL data-type=MIME data-refresh=#table> ----------------
  function upload(form) {
    var file = form.querySelector("input[type=file]").files[0];
    var progress = form.querySelector("progress");
    var status = form.querySelector(".upload-status");
    if (!file) return;
    var params = new URLSearchParams();
    Array.prototype.forEach.call(form.elements, function (el) {
      if (!el.name || el.type === "file" || el.name === "csrf") return;
      if (el.type === "checkbox") params.set(el.name, el.checked ? "true" : "false");
      else if (el.value) params.set(el.name, el.value);
    });
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.getAttribute("data-upload") + "?" + params.toString());
    xhr.setRequestHeader("Content-Type", form.getAttribute("data-type") || "application/zip");
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRF-Token", csrf());
    xhr.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) progress.value = Math.round((100 * e.loaded) / e.total);
    });
    xhr.addEventListener("load", function () {
      var body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = {}; }
      if (xhr.status >= 200 && xhr.status < 300) {
        progress.value = 100;
        var data = body.data || body;
        status.textContent = "Uploaded: " + (data.build_status || data.status || "ok") + ".";
        status.className = "upload-status ok";
        form.reset();
        var target = document.querySelector(form.getAttribute("data-refresh"));
        if (target && window.htmx) window.htmx.trigger(target, "refresh");
      } else {
        status.textContent = (body.message || "Upload failed") + " (" + xhr.status + ")";
        status.className = "upload-status error";
      }
    });
    xhr.addEventListener("error", function () {
      status.textContent = "The upload did not reach the appliance.";
      status.className = "upload-status error";
    });
    progress.value = 0;
    status.textContent = "Uploading…";
    status.className = "upload-status";
    xhr.send(file);
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.hasAttribute("data-upload")) {
      event.preventDefault();
      upload(form);
    }
  });

  // ---- playground ------------------------------------------------------------------------
  function playground() {
    var form = document.getElementById("playground");
    if (!form) return;
    var choices = JSON.parse(form.getAttribute("data-choices"));
    var samples = JSON.parse(form.getAttribute("data-samples"));
    var model = form.querySelector("#pg-model");
    var endpoint = form.querySelector("#pg-endpoint");
    var body = form.querySelector("#pg-body");
    var streamButton = document.getElementById("pg-stream");
    var lastSample = "";

    function fillBody() {
      if (body.value && body.value !== lastSample) return; // the user's own edits stay
      lastSample = JSON.stringify(samples[endpoint.value] || {}, null, 2);
      body.value = lastSample;
    }
    function fillEndpoints() {
      var allowed = choices[model.value] || [];
      var keep = endpoint.value;
      endpoint.innerHTML = "";
      allowed.forEach(function (path) {
        var option = document.createElement("option");
        option.textContent = path;
        endpoint.appendChild(option);
      });
      if (allowed.indexOf(keep) >= 0) endpoint.value = keep;
      streamButton.hidden = endpoint.value !== "/v1/text-generation";
      fillBody();
    }
    model.addEventListener("change", fillEndpoints);
    endpoint.addEventListener("change", function () {
      streamButton.hidden = endpoint.value !== "/v1/text-generation";
      fillBody();
    });
    fillEndpoints();

    streamButton.addEventListener("click", function () {
      var result = document.getElementById("result");
      result.innerHTML = "";
      var heading = document.createElement("h2");
      heading.textContent = "Streaming…";
      var out = document.createElement("pre");
      out.id = "answer";
      result.appendChild(heading);
      result.appendChild(out);
      var data = new URLSearchParams(new FormData(form));
      fetch("/console/playground/stream", {
        method: "POST",
        body: data,
        headers: { "X-CSRF-Token": csrf(), Accept: "text/event-stream" },
        credentials: "same-origin",
      }).then(function (response) {
        if (!response.ok) {
          return response.text().then(function (text) {
            heading.textContent = "Error " + response.status;
            out.textContent = text;
          });
        }
        var reader = response.body.getReader();
        var decoder = new TextDecoder();
        var buffer = "";
        function pump() {
          return reader.read().then(function (chunk) {
            if (chunk.done) return;
            buffer += decoder.decode(chunk.value, { stream: true });
            var events = buffer.split(/\r?\n\r?\n/);
            buffer = events.pop();
            events.forEach(function (raw) {
              var kind = "message", payload = "";
              raw.split(/\r?\n/).forEach(function (line) {
                if (line.indexOf("event:") === 0) kind = line.slice(6).trim();
                else if (line.indexOf("data:") === 0) payload += line.slice(5).trim();
              });
              if (!payload) return;
              var value = JSON.parse(payload);
              if (kind === "piece") out.textContent += value.text;
              else if (kind === "done") heading.textContent = "Done (" + value.tokens + " tokens)";
              else if (kind === "error") {
                heading.textContent = "Error";
                out.textContent += "\n" + value.message;
              }
            });
            return pump();
          });
        }
        return pump();
      });
    });
  }

  // ---- usage charts (uPlot) --------------------------------------------------------------
  var PALETTE = ["#2563eb", "#db2777", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#dc2626"];

  function charts() {
    var holder = document.getElementById("usage-charts");
    if (!holder || !window.uPlot) return;
    var chart = JSON.parse(holder.getAttribute("data-chart"));
    var plots = [];
    holder.querySelectorAll(".chart").forEach(function (el) {
      var byModel = chart.series[el.getAttribute("data-measure")];
      var models = Object.keys(byModel);
      var series = [{}];
      var data = [chart.days];
      models.forEach(function (name, i) {
        series.push({ label: name, stroke: PALETTE[i % PALETTE.length], width: 2, points: { show: true } });
        data.push(byModel[name]);
      });
      if (!models.length) {
        series.push({ label: "no requests", stroke: "#9ca3af" });
        data.push(chart.days.map(function () { return 0; }));
      }
      var options = {
        width: Math.max(280, el.clientWidth),
        height: 220,
        series: series,
        scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(1, max)]; } } },
        axes: [{}, {}],
      };
      plots.push({ el: el, plot: new window.uPlot(options, data, el) });
    });
    window.addEventListener("resize", function () {
      plots.forEach(function (p) {
        p.plot.setSize({ width: Math.max(280, p.el.clientWidth), height: 220 });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    playground();
    charts();
  });
})();
