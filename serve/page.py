"""The web page served at ``/``: pick a photo, see every face boxed and named; enrol a face under a
name. Plain HTML and JavaScript calling the JSON API (no build step, nothing fetched from elsewhere).
The API key, when the service needs one, is typed in and kept in the tab's sessionStorage."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>facefuse</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5rem auto; max-width: 960px; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  section { border: 1px solid #ddd; border-radius: 6px; padding: .8rem 1rem; margin: 1rem 0; }
  label { margin-right: 1rem; }
  canvas { max-width: 100%; min-width: 240px; border: 1px solid #ccc; display: block; margin-top: .6rem; }
  #status, #enrol-status { min-height: 1.4em; color: #555; }
  .error { color: #b00020 !important; }
  table { border-collapse: collapse; margin-top: .5rem; }
  td, th { padding: .2rem .6rem; border-bottom: 1px solid #eee; text-align: left; }
</style>
</head>
<body>
<h1>facefuse</h1>
<p>Search a photo for enrolled faces, or enrol a face under a name. <a href="/docs">API</a></p>
<section>
  <label>API key <input id="key" type="password" size="40" autocomplete="off"></label>
  <label>Alignment <select id="align">
    <option value="">service default</option><option value="landmarks">landmarks (photos)</option>
    <option value="none">none (aligned crops)</option></select></label>
</section>
<section>
  <h2>Search</h2>
  <input id="photo" type="file" accept="image/*">
  <button id="search">Search</button>
  <div id="status"></div>
  <canvas id="canvas" width="0" height="0"></canvas>
  <table id="results"><thead><tr><th>#</th><th>identity</th><th>score</th></tr></thead><tbody></tbody></table>
</section>
<section>
  <h2>Enrol</h2>
  <input id="name" placeholder="name" maxlength="100">
  <input id="enrol-photo" type="file" accept="image/*">
  <button id="enrol">Enrol</button>
  <div id="enrol-status"></div>
</section>
<script>
const $ = (id) => document.getElementById(id);
$("key").value = sessionStorage.getItem("facefuse-key") || "";
$("key").addEventListener("change", () => sessionStorage.setItem("facefuse-key", $("key").value));

function headers() {
  const k = $("key").value.trim();
  return k ? {"X-API-Key": k} : {};
}
function query() {
  const a = $("align").value;
  return a ? "?align=" + encodeURIComponent(a) : "";
}
async function call(url, form) {
  const r = await fetch(url, {method: "POST", body: form, headers: headers()});
  const body = await r.json().catch(() => ({error: "answer was not JSON (" + r.status + ")"}));
  if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  return body;
}
function say(id, text, bad) {
  $(id).textContent = text;
  $(id).className = bad ? "error" : "";
}
function draw(file, answer) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const c = $("canvas"), g = c.getContext("2d");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      g.drawImage(img, 0, 0);
      const line = Math.max(2, Math.round(c.width / 200));
      g.lineWidth = line;
      g.font = Math.max(12, Math.round(c.width / 30)) + "px sans-serif";
      answer.faces.forEach((f, i) => {
        const [x0, y0, x1, y1] = f.box;
        const known = f.identity !== "unknown";
        g.strokeStyle = known ? "#1a7f37" : "#cf222e";
        g.strokeRect(x0, y0, x1 - x0, y1 - y0);
        const text = (i + 1) + " " + f.identity;
        const w = g.measureText(text).width + 6, h = parseInt(g.font) + 4;
        g.fillStyle = g.strokeStyle;
        g.fillRect(x0, Math.max(0, y0 - h), w, h);
        g.fillStyle = "#fff";
        g.fillText(text, x0 + 3, Math.max(h - 4, y0 - 4));
      });
      URL.revokeObjectURL(img.src);
      resolve();
    };
    img.src = URL.createObjectURL(file);
  });
}
$("search").addEventListener("click", async () => {
  const file = $("photo").files[0];
  if (!file) { say("status", "pick a photo first", true); return; }
  say("status", "searching...");
  const form = new FormData(); form.append("photo", file);
  try {
    const answer = await call("/v1/search" + query(), form);
    await draw(file, answer);
    const rows = answer.faces.map((f, i) =>
      "<tr><td>" + (i + 1) + "</td><td class='identity'></td><td>" +
      (f.score === null ? "-" : f.score.toFixed(3)) + "</td></tr>");
    const body = $("results").querySelector("tbody");
    body.innerHTML = rows.join("");
    body.querySelectorAll(".identity").forEach((td, i) => { td.textContent = answer.faces[i].identity; });
    say("status", answer.faces.length + " face(s)" + (answer.note ? " - " + answer.note : ""));
    document.body.dataset.searched = String(Date.now());
  } catch (e) { say("status", e.message, true); }
});
$("enrol").addEventListener("click", async () => {
  const name = $("name").value.trim(), file = $("enrol-photo").files[0];
  if (!name || !file) { say("enrol-status", "give a name and a photo", true); return; }
  const form = new FormData(); form.append("photo", file);
  try {
    const r = await call("/v1/identities/" + encodeURIComponent(name) + "/faces" + query(), form);
    say("enrol-status", "enrolled " + r.identity + " (" + r.gallery.rows + " faces in the gallery)");
  } catch (e) { say("enrol-status", e.message, true); }
});
</script>
</body>
</html>
"""
