// The page's only script: upload one image, show the prediction, probability bars with the decision threshold,
// refer flag and Grad-CAM map (captioned with the class it explains). Served under a strict CSP: no inline code.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  let current = null; // the run whose answers the page shows; any other run's answers are stale and dropped
  let runs = 0;

  function headers() {
    const key = $("apikey").value.trim();
    return key ? { "X-API-Key": key } : {};
  }

  async function post(path, file, signal) {
    const body = new FormData();
    body.append("files", file, file.name);
    return fetch(path, { method: "POST", body, headers: headers(), signal });
  }

  async function errorText(resp) {
    try { const j = await resp.json(); return (j.error && j.error.message) || resp.statusText; }
    catch (e) { return resp.status + " " + resp.statusText; }
  }

  const pct = (p) => (100 * p).toFixed(1) + " %";

  // Text headers arrive percent-encoded where not printable ASCII (class names in any script; "%" itself).
  function headerText(resp, name) {
    const raw = resp.headers.get(name);
    if (raw === null) return null;
    try { return decodeURIComponent(raw); } catch (e) { return raw; }
  }

  // A new file supersedes the one in flight: its requests are aborted, and whatever still arrives for it is
  // ignored (checked after every await), so a slow first file cannot overwrite the second one's result.
  function startRun(file) {
    if (current) {
      current.controller.abort();
      current.urls.forEach((u) => URL.revokeObjectURL(u));
    }
    current = { id: ++runs, file, controller: new AbortController(), urls: [] };
    return current;
  }

  const stale = (run) => run !== current;

  function objectUrl(run, blob) {
    const url = URL.createObjectURL(blob);
    run.urls.push(url); // revoked when the next file replaces this one
    return url;
  }

  function showBars(probs, positive, threshold) {
    const bars = $("bars");
    bars.textContent = "";
    for (const [name, p] of Object.entries(probs || {})) {
      const row = document.createElement("div");
      row.className = "bar";
      row.dataset.cls = name;
      const label = document.createElement("div");
      const marked = name === positive && threshold !== null && threshold !== undefined;
      label.textContent = name + ": " + pct(p) + (marked ? " (called " + name + " at >= " + pct(threshold) + ")" : "");
      const track = document.createElement("div");
      track.className = "track";
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = (100 * p).toFixed(1) + "%";
      track.appendChild(fill);
      if (marked) { // where the decision flips: a bar past this line is a positive call, even below 50 %
        const marker = document.createElement("div");
        marker.className = "marker";
        marker.style.left = (100 * threshold).toFixed(1) + "%";
        marker.title = "decision threshold " + pct(threshold);
        track.appendChild(marker);
      }
      row.append(label, track);
      bars.appendChild(row);
    }
  }

  function showThreshold(data) {
    const t = $("threshold");
    if (data.threshold === null || data.threshold === undefined) { t.hidden = true; t.textContent = ""; return; }
    const point = data.operating_point ? " (operating point: " + data.operating_point + ")" : "";
    t.textContent = data.positive_class
      ? "Decision threshold: " + data.positive_class + " is predicted when its probability is at least " +
        pct(data.threshold) + point + ", marked by the line on its bar."
      : "Decision threshold: " + pct(data.threshold) + point + ".";
    t.hidden = false;
  }

  function showResult(data, file) {
    const r = data.results[0];
    $("result").hidden = false;
    $("result-file").textContent = file.name;
    $("version").textContent = data.model_version;
    $("prediction").textContent = r.status === "ok" ? r.prediction + " (" + pct(r.confidence) + ")"
      : r.status === "not_xray" ? "not an X-ray" : "no result: " + r.message;
    $("refer").hidden = !r.refer;
    $("refer").textContent = r.refer ? "Refer for expert review: " + (r.message || "low confidence") : "";
    showBars(r.probabilities, data.positive_class, data.threshold);
    showThreshold(data);
  }

  function showPreview(run, file) {
    const img = $("preview");
    img.hidden = false;
    $("preview-caption").textContent = "Image";
    img.onerror = () => { // DICOM, TIFF: formats the browser cannot draw
      if (stale(run)) return;
      img.hidden = true;
      $("preview-caption").textContent = "No preview: the browser cannot display this format (e.g. DICOM)";
    };
    img.src = objectUrl(run, file);
  }

  function resetOverlay(text) {
    const overlay = $("overlay");
    overlay.removeAttribute("src");
    overlay.hidden = true;
    $("overlay-caption").textContent = text;
    $("overlay-warning").hidden = true;
    $("overlay-warning").textContent = "";
    $("overlay-show").hidden = true;
  }

  async function showOverlay(run, file) {
    const resp = await post("/v1/explain", file, run.controller.signal);
    if (stale(run)) return;
    if (!resp.ok) {
      const why = await errorText(resp);
      if (!stale(run)) resetOverlay("Grad-CAM unavailable: " + why);
      return;
    }
    const blob = await resp.blob();
    if (stale(run)) return;
    const cls = headerText(resp, "X-Explained-Class");
    const positive = headerText(resp, "X-Positive-Class");
    const overlay = $("overlay");
    overlay.src = objectUrl(run, blob);
    $("overlay-caption").textContent = "Grad-CAM: evidence for " + (cls || "the predicted class") +
      " (relative scale within this image; not a measure of certainty)";
    if (cls && positive && cls !== positive) {
      // Scaled within the image, the map of a confident negative call is as red as a fracture's: not shown
      // unless asked for, so it is not read as a fracture locator.
      $("overlay-warning").textContent = "This image was called " + cls + ". A heat map of a negative call is " +
        "not a fracture locator: it shows where the evidence for " + cls + " lies, and its hottest region is " +
        "red whatever the probability.";
      $("overlay-warning").hidden = false;
      $("overlay-show").hidden = false;
    } else {
      overlay.hidden = false;
    }
  }

  async function analyse(file) {
    const run = startRun(file);
    $("status").className = "";
    $("status").textContent = "Analysing " + file.name + " ...";
    $("drop").classList.add("busy");
    $("result").hidden = true;
    $("result-file").textContent = "";
    $("prediction").textContent = "";
    $("bars").textContent = "";
    $("threshold").hidden = true;
    resetOverlay("Grad-CAM: waiting for the prediction ...");
    showPreview(run, file);
    try {
      const resp = await post("/v1/predict", file, run.controller.signal);
      if (stale(run)) return;
      if (!resp.ok) throw new Error(await errorText(resp));
      const data = await resp.json();
      if (stale(run)) return;
      showResult(data, file);
      if (data.results[0].status === "ok") {
        resetOverlay("Grad-CAM: computing ...");
        $("status").textContent = "Prediction for " + file.name + " shown; computing the Grad-CAM map ...";
        await showOverlay(run, file);
      } else {
        resetOverlay("No Grad-CAM map: there is no prediction to explain");
      }
      if (stale(run)) return;
      $("status").textContent = "Done.";
    } catch (err) {
      if (stale(run)) return; // aborted or superseded: the newer file's run owns the page
      $("status").className = "error";
      $("status").textContent = "Error (" + file.name + "): " + err.message;
    } finally {
      if (!stale(run)) $("drop").classList.remove("busy");
    }
  }

  const drop = $("drop");
  const picker = $("file");
  picker.addEventListener("change", () => {
    if (picker.files.length) analyse(picker.files[0]);
    picker.value = ""; // choosing the same file again runs again
  });
  // Keyboard: the drop zone is focusable; Enter or Space on it opens the file chooser.
  drop.addEventListener("keydown", (e) => {
    if (e.target === drop && (e.key === "Enter" || e.key === " ")) {
      e.preventDefault();
      picker.click();
    }
  });
  $("overlay-show").addEventListener("click", () => {
    $("overlay").hidden = false;
    $("overlay-show").hidden = true;
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]);
  });
  // A file dropped beside the zone would make the browser leave the page to open it.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
})();
