// featurekit explorer: hover tips on tokens, expandable example rows, and the try-a-text interactions.
// Plain DOM, no inline handlers (the Content-Security-Policy allows scripts from /static only).
"use strict";

(function () {
  const tip = document.getElementById("tip");

  function showTip(el, x, y) {
    const v = el.dataset.v;
    if (v === undefined || !tip) return;
    const shown = el.dataset.shade !== undefined ? el.dataset.shade : v;
    tip.textContent = JSON.stringify(el.textContent) + "  " + (isNaN(Number(shown)) ? shown : "act " + shown);
    tip.hidden = false;
    const r = el.getBoundingClientRect();
    tip.style.left = Math.min(window.innerWidth - tip.offsetWidth - 8, Math.max(4, (x === undefined ? r.left : x) + 10)) + "px";
    tip.style.top = (r.bottom + 6) + "px";
  }

  document.addEventListener("mouseover", function (ev) {
    const el = ev.target.closest ? ev.target.closest(".t[data-v]") : null;
    if (el) showTip(el, ev.clientX, ev.clientY);
  });
  document.addEventListener("mouseout", function (ev) {
    const el = ev.target.closest ? ev.target.closest(".t[data-v]") : null;
    if (el && tip) tip.hidden = true;
  });
  document.addEventListener("focusin", function (ev) {
    if (ev.target.matches && ev.target.matches(".t[data-v]")) showTip(ev.target);
  });

  // feature page: a click on an example row shows its whole context
  document.addEventListener("click", function (ev) {
    const row = ev.target.closest ? ev.target.closest(".ex") : null;
    if (row && !ev.target.closest("a")) row.classList.toggle("open");
  });

  // try a text: a click on a token shows its features; a click on a feature row shades the text by it
  const text = document.getElementById("trytext");
  if (!text) return;
  const tokens = Array.from(text.querySelectorAll(".tk"));
  const hint = document.getElementById("tokhint");

  function selectToken(el) {
    tokens.forEach(function (t) { t.classList.toggle("sel", t === el); });
    document.querySelectorAll(".tokfeats").forEach(function (p) { p.hidden = p.id !== "tf-" + el.dataset.i; });
    if (hint) hint.hidden = true;
  }

  const levels = 16;
  function shade(row) {
    const acts = row.dataset.acts.split(",").map(Number);
    const peak = Math.max.apply(null, acts.map(Math.abs)) || 1;
    document.querySelectorAll("tr.pick").forEach(function (r) { r.classList.toggle("sel", r === row); });
    tokens.forEach(function (t, i) {
      for (let k = 1; k <= levels; k++) t.classList.remove("p" + k, "n" + k);
      const a = acts[i] || 0;
      if (a !== 0) {
        const step = Math.max(1, Math.min(levels, Math.ceil(levels * Math.abs(a) / peak)));
        t.classList.add((a > 0 ? "p" : "n") + step);
      }
      t.dataset.shade = "#" + row.dataset.f + " = " + (a === 0 ? "0" : Number(a.toPrecision(4)));
    });
  }

  text.addEventListener("click", function (ev) {
    const el = ev.target.closest(".tk");
    if (el) selectToken(el);
  });
  text.addEventListener("keydown", function (ev) {
    if ((ev.key === "Enter" || ev.key === " ") && ev.target.matches(".tk")) { ev.preventDefault(); selectToken(ev.target); }
  });
  document.querySelectorAll("tr.pick").forEach(function (row) {
    row.addEventListener("click", function (ev) { if (!ev.target.closest("a")) shade(row); });
    row.addEventListener("keydown", function (ev) { if (ev.key === "Enter") shade(row); });
  });
})();

// graph viewer (/g/NAME/): hover details, pruning sliders, pins, interventions. Every text goes in as textContent.
(function () {
  const svg = document.getElementById("graph");
  if (!svg) return;
  const tip = document.getElementById("tip");
  const nodes = Array.from(svg.querySelectorAll(".nd"));
  const edges = Array.from(svg.querySelectorAll("line.e"));
  const byId = new Map(nodes.map(function (n) { return [n.dataset.id, n]; }));
  const pinned = [];
  const nodeSlider = document.getElementById("g-node"), edgeSlider = document.getElementById("g-edge");
  const detail = document.getElementById("g-detail"), pinList = document.getElementById("g-pinned");
  const form = document.getElementById("g-int"), msg = document.getElementById("g-int-msg"), out = document.getElementById("g-int-out");
  const kinds = {feat: "feature", err: "error", emb: "embedding", logit: "logit"};

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function lines(n) {
    const d = n.dataset, out = [];
    const name = d.kind === "feat" ? "feature L" + d.layer + " #" + d.latent : kinds[d.kind] + (d.kind === "logit" ? "" : " " + d.layer);
    out.push(name + "  ·  position " + d.pos + " " + JSON.stringify(d.tok));
    if (d.kind === "logit" || d.kind === "emb") { if (d.label) out.push(d.label); }
    if (d.act) out.push((d.kind === "err" ? "error norm " : "activation ") + d.act);
    if (d.inf) out.push("influence " + d.inf);
    if (d.kind === "feat") {
      if (d.expl) out.push("explanation: " + d.expl);
      const top = JSON.parse(d.top || "[]");
      if (top.length) out.push("top tokens: " + top.map(function (t) { return JSON.stringify(t); }).join(" "));
      if (!d.href) out.push("(no feature page: no served run holds this layer's transcoder)");
      else if (!d.expl && !top.length) out.push("(run " + d.run + ": no explanation stored)");
    }
    return out;
  }

  function highlight(id, on) {
    edges.forEach(function (e) { if (e.dataset.s === id || e.dataset.t === id) e.classList.toggle("hl", on); });
  }

  svg.addEventListener("mouseover", function (ev) {
    const n = ev.target.closest(".nd");
    if (!n) return;
    const text = lines(n);
    detail.textContent = text.join("\n");
    detail.classList.remove("dim");
    tip.textContent = text.join("\n");
    tip.classList.add("gtip");
    tip.hidden = false;
    const r = n.getBoundingClientRect();
    tip.style.left = Math.min(window.innerWidth - tip.offsetWidth - 8, r.right + 8) + "px";
    tip.style.top = (r.bottom + 6) + "px";
    highlight(n.dataset.id, true);
  });
  svg.addEventListener("mouseout", function (ev) {
    const n = ev.target.closest(".nd");
    if (!n) return;
    tip.hidden = true;
    tip.classList.remove("gtip");
    if (pinned.indexOf(n.dataset.id) < 0) highlight(n.dataset.id, false);
  });

  function renderPins() {
    pinList.textContent = "";
    if (!pinned.length) pinList.appendChild(el("li", "nothing pinned", "dim"));
    pinned.forEach(function (id) {
      const n = byId.get(id), li = el("li");
      li.dataset.id = id;
      li.appendChild(el("span", lines(n)[0] + (n.dataset.act ? "  act " + n.dataset.act : "")));
      if (n.dataset.href) {
        const a = el("a", "page", "flink");
        a.setAttribute("href", n.dataset.href);
        li.appendChild(a);
      }
      if (n.dataset.kind === "feat") {
        const b = el("button", "intervene", "mini");
        b.type = "button";
        b.addEventListener("click", function () { document.getElementById("g-int-node").value = id; });
        li.appendChild(b);
      }
      const x = el("button", "×", "mini ghost");
      x.type = "button";
      x.setAttribute("aria-label", "unpin");
      x.addEventListener("click", function () { togglePin(id); });
      li.appendChild(x);
      pinList.appendChild(li);
    });
  }

  function togglePin(id) {
    const i = pinned.indexOf(id), n = byId.get(id);
    if (i >= 0) pinned.splice(i, 1); else pinned.push(id);
    n.classList.toggle("pin", i < 0);
    highlight(id, i < 0);
    if (i < 0 && n.dataset.kind === "feat") {
      document.getElementById("g-int-node").value = id;
      if (n.dataset.act) document.getElementById("g-int-value").value = "0";
    }
    renderPins();
    apply();
  }

  svg.addEventListener("click", function (ev) {
    const n = ev.target.closest(".nd");
    if (n) togglePin(n.dataset.id);
  });
  svg.addEventListener("dblclick", function (ev) {
    const n = ev.target.closest(".nd");
    if (n && n.dataset.href) window.location.assign(n.dataset.href);
  });
  svg.addEventListener("keydown", function (ev) {
    const n = ev.target.closest(".nd");
    if (n && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); togglePin(n.dataset.id); }
  });

  // pruning: hide feature and error nodes beyond a cumulative influence, and edges below a share of the largest |weight|
  function apply() {
    const tn = Number(nodeSlider.value), te = Number(edgeSlider.value), off = new Set();
    document.getElementById("g-node-v").textContent = tn.toFixed(2);
    document.getElementById("g-edge-v").textContent = te.toFixed(2);
    nodes.forEach(function (n) {
      const d = n.dataset;
      const hide = (d.kind === "feat" || d.kind === "err") && d.inf !== "" && Number(d.inf) > tn && pinned.indexOf(d.id) < 0;
      n.classList.toggle("off", hide);
      if (hide) off.add(d.id);
    });
    let shown = 0;
    edges.forEach(function (e) {
      const hide = off.has(e.dataset.s) || off.has(e.dataset.t) || Number(e.dataset.rel) < te;
      e.classList.toggle("off", hide);
      if (!hide) shown++;
    });
    document.getElementById("g-count").textContent = (nodes.length - off.size) + " of " + nodes.length + " nodes, " +
      shown + " of " + edges.length + " edges shown";
  }
  nodeSlider.addEventListener("input", apply);
  edgeSlider.addEventListener("input", apply);
  apply();

  function table(title, rows) {
    const t = el("table", undefined, "grid gout"), head = t.createTHead().insertRow();
    [title, "p", "Δp with clamp"].forEach(function (h) { head.appendChild(el("th", h)); });
    const body = t.createTBody();
    rows.forEach(function (r) {
      const tr = body.insertRow();
      tr.appendChild(el("td", JSON.stringify(r.token), "tok"));
      tr.appendChild(el("td", r.prob.toFixed(4), "num"));
      tr.appendChild(el("td", (r.delta_prob >= 0 ? "+" : "") + r.delta_prob.toFixed(4), "num " + (r.delta_prob >= 0 ? "up" : "down")));
    });
    return t;
  }

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    const node = document.getElementById("g-int-node").value.trim(), value = document.getElementById("g-int-value").value;
    out.textContent = "";
    msg.className = "gmsg";
    msg.textContent = "running the replacement model…";
    fetch(form.dataset.url, {method: "POST", headers: {"content-type": "application/json"},
                             body: JSON.stringify({clamps: [{node: node, value: value === "" ? null : Number(value)}]})})
      .then(function (r) { return r.json().then(function (data) { return [r.ok, data]; }); })
      .then(function (res) {
        const data = res[1];
        if (!res[0]) { msg.className = "gmsg bad"; msg.textContent = "error: " + (data.error || "the server refused"); return; }
        const c = data.clamps[0];
        msg.textContent = c.node + " set to " + c.value + " (was " + (c.was === null ? "?" : c.was.toPrecision(4)) + ")";
        out.appendChild(table("top logits, clamped", data.clamped));
        out.appendChild(table("before", data.baseline));
      })
      .catch(function (err) { msg.className = "gmsg bad"; msg.textContent = "error: " + err; });
  });
})();

// A vision run's "try an image" upload: the file's bytes go as the POST body (image/png or image/jpeg); the JSON
// answer fills the heat-map (a data: URL) and the table, every string through textContent.
(function () {
  const form = document.getElementById("upload");
  if (!form) return;
  const result = document.getElementById("upload-result");
  const error = document.getElementById("upload-error");
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    const file = form.elements.image.files[0];
    error.hidden = true;
    if (!file) { error.textContent = "choose a PNG or JPEG file first"; error.hidden = false; return; }
    const feature = form.elements.feature.value.trim();
    const target = form.action + (feature ? "?feature=" + encodeURIComponent(feature) : "");
    fetch(target, { method: "POST", body: file, headers: { "content-type": file.type || "application/octet-stream" } })
      .then(function (r) { return r.json(); })
      .then(function (data) {
        if (data.error) { error.textContent = data.error; error.hidden = false; result.hidden = true; return; }
        document.getElementById("upload-title").textContent = data.feature === null ? "Your image: no feature fires"
          : "Feature #" + data.feature + " over your image (" + data.size[0] + " × " + data.size[1] + ")";
        const img = document.getElementById("upload-heat");
        if (data.heat) img.src = data.heat; else img.removeAttribute("src");
        const rows = document.getElementById("upload-rows");
        rows.textContent = "";
        data.top.forEach(function (t) {
          const tr = document.createElement("tr");
          ["#" + t.latent, t.value.toPrecision(4), t.where, t.kind].forEach(function (v) {
            const td = document.createElement("td");
            td.textContent = v;
            tr.appendChild(td);
          });
          rows.appendChild(tr);
        });
        result.hidden = false;
      })
      .catch(function (err) { error.textContent = "the upload failed: " + err; error.hidden = false; });
  });
})();
