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
