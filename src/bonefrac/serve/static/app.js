// The page's only script: upload one image, show the prediction, probability bars, refer flag and Grad-CAM.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);

  function headers() {
    const key = $("apikey").value.trim();
    return key ? { "X-API-Key": key } : {};
  }

  async function post(path, file) {
    const body = new FormData();
    body.append("files", file, file.name);
    return fetch(path, { method: "POST", body, headers: headers() });
  }

  async function errorText(resp) {
    try { const j = await resp.json(); return (j.error && j.error.message) || resp.statusText; }
    catch (e) { return resp.status + " " + resp.statusText; }
  }

  function showBars(probs) {
    const bars = $("bars");
    bars.textContent = "";
    for (const [name, p] of Object.entries(probs || {})) {
      const row = document.createElement("div");
      row.className = "bar";
      row.dataset.cls = name;
      const label = document.createElement("div");
      label.textContent = name + ": " + (100 * p).toFixed(1) + " %";
      const track = document.createElement("div");
      track.className = "track";
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = (100 * p).toFixed(1) + "%";
      track.appendChild(fill);
      row.append(label, track);
      bars.appendChild(row);
    }
  }

  function showResult(data, file) {
    const r = data.results[0];
    $("result").hidden = false;
    $("version").textContent = data.model_version;
    $("prediction").textContent = r.status === "ok" ? r.prediction + " (" + (100 * r.confidence).toFixed(1) + " %)"
      : r.status === "not_xray" ? "not an X-ray" : "no result: " + r.message;
    $("refer").hidden = !r.refer;
    $("refer").textContent = r.refer ? "Refer for expert review: " + (r.message || "low confidence") : "";
    showBars(r.probabilities);
    if (/^image\/(png|jpeg|webp|bmp)$/.test(file.type)) $("preview").src = URL.createObjectURL(file);
  }

  async function showOverlay(file) {
    const resp = await post("/v1/explain", file);
    if (!resp.ok) { $("overlay-caption").textContent = "Grad-CAM unavailable: " + (await errorText(resp)); return; }
    const url = URL.createObjectURL(await resp.blob());
    $("overlay").src = url;
    // DICOM and other formats the browser cannot draw: the overlay shows the image itself.
    if (!$("preview").src) $("preview").src = url;
  }

  async function analyse(file) {
    $("status").className = "";
    $("status").textContent = "Analysing " + file.name + " ...";
    $("result").hidden = true;
    $("preview").removeAttribute("src");
    $("overlay").removeAttribute("src");
    try {
      const resp = await post("/v1/predict", file);
      if (!resp.ok) throw new Error(await errorText(resp));
      const data = await resp.json();
      showResult(data, file);
      $("status").textContent = "Done.";
      if (data.results[0].status === "ok") await showOverlay(file);
    } catch (err) {
      $("status").className = "error";
      $("status").textContent = "Error: " + err.message;
    }
  }

  const drop = $("drop");
  $("file").addEventListener("change", (e) => { if (e.target.files.length) analyse(e.target.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]);
  });
})();
