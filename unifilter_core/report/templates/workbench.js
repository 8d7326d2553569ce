"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("workbench-data").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";
  const state = {};

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  function decodeScores(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }
  function fmt(x) { return Number.isFinite(x) ? x.toFixed(4) : "n/a"; }
  function pct(x) { return (100 * x).toFixed(1) + "%"; }

  // Number of scores >= t: exact (binary search over the sorted scores) or interpolated within one fine bin.
  function keptAt(s, t) {
    if (s.n === 0) return 0;
    if (s.scores) {
      let lo = 0, hi = s.scores.length;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (s.scores[mid] < t) lo = mid + 1; else hi = mid; }
      return s.scores.length - lo;
    }
    const e = s.fine_edges, h = s.fine_hist;
    let kept = 0;
    for (let i = 0; i < h.length; i++) {
      if (e[i] >= t) kept += h[i];
      else if (e[i + 1] > t) kept += h[i] * (e[i + 1] - t) / (e[i + 1] - e[i]);
    }
    return Math.round(kept);
  }
  // The threshold that keeps `keep` of the samples: the k-th highest score, k = max(1, ceil(keep * n)).
  function thresholdFor(s, keep) {
    const k = Math.max(1, Math.ceil(keep * s.n - 1e-9));
    if (s.scores) return s.scores[s.n - k];
    const e = s.fine_edges, h = s.fine_hist;
    let acc = 0;
    for (let i = h.length - 1; i >= 0; i--) { acc += h[i]; if (acc >= k) return e[i]; }
    return e[0];
  }

  function histogram(s, nbins) {
    const lo = s.min, hi = s.max > s.min ? s.max : s.min + 1;
    const w = (hi - lo) / nbins, counts = new Array(nbins).fill(0);
    const put = (x, c) => { counts[Math.min(nbins - 1, Math.max(0, Math.floor((x - lo) / w)))] += c; };
    if (s.scores) { for (const x of s.scores) put(x, 1); }
    else { s.fine_hist.forEach((c, i) => put((s.fine_edges[i] + s.fine_edges[i + 1]) / 2, c)); }
    return { lo: lo, w: w, counts: counts };
  }

  function drawHist(s) {
    const W = 640, H = 160, P = 24, svgEl = s.dom.svg;
    while (svgEl.firstChild) svgEl.removeChild(svgEl.firstChild);
    const hst = s.hist, max = Math.max(1, ...hst.counts), n = hst.counts.length;
    const bw = (W - 2 * P) / n, xOf = (x) => P + (x - hst.lo) / (hst.w * n) * (W - 2 * P);
    hst.counts.forEach((c, i) => {
      const h = (H - 2 * P) * c / max, left = hst.lo + i * hst.w;
      svgEl.appendChild(svg("rect", { x: P + i * bw + 0.5, y: H - P - h, width: Math.max(1, bw - 1), height: h,
        class: left + hst.w > s.t ? "kept" : "dropped" }));
    });
    const tx = Math.min(W - P, Math.max(P, xOf(s.t)));
    svgEl.appendChild(svg("line", { x1: tx, x2: tx, y1: 4, y2: H - P, class: "t" }));
    const lab = (x, txt, anchor) => {
      const t = svg("text", { x: x, y: H - 8, "text-anchor": anchor }); t.textContent = txt; svgEl.appendChild(t);
    };
    lab(P, fmt(hst.lo), "start");
    lab(W - P, fmt(hst.lo + hst.w * n), "end");
    const top = svg("text", { x: P, y: 12 }); top.textContent = "max bin " + max; svgEl.appendChild(top);
  }

  function card(ref, t) {
    const c = el("div", { class: "card" + (ref.score >= t ? " is-kept" : ""), "data-testid": "sample-card",
      title: ref.partition_key + " / " + ref.key + (ref.uid ? " / uid " + ref.uid : "") });
    if (ref.thumb && ref.thumb.startsWith("data:image/jpeg;base64,")) {
      c.appendChild(el("img", { src: ref.thumb, alt: "sample " + ref.key, loading: "lazy" }));
    } else {
      c.appendChild(el("div", { class: "ph" }, ref.note || "no image"));
    }
    const line = el("div", {});
    line.appendChild(el("span", { class: "score" }, fmt(ref.score)));
    line.appendChild(document.createTextNode(ref.score >= t ? "  kept" : "  dropped"));
    if (ref.n_images > 1) line.appendChild(document.createTextNode("  (" + ref.n_images + " images)"));
    c.appendChild(line);
    c.appendChild(el("div", { class: "text" }, ref.text || ""));
    return c;
  }

  function fillCards(container, refs, t) {
    while (container.firstChild) container.removeChild(container.firstChild);
    if (!refs.length) container.appendChild(el("span", { class: "muted" }, "no samples"));
    for (const ref of refs) container.appendChild(card(ref, t));
  }

  // The middle band: the n pool samples (sorted by score) centred on the threshold.
  function aroundThreshold(s) {
    const n = DATA.samples_per_band, pool = s.bands.pool || [];
    let i = 0;
    while (i < pool.length && pool[i].score < s.t) i++;
    const start = Math.max(0, Math.min(pool.length - n, i - Math.floor(n / 2)));
    return pool.slice(start, start + n);
  }

  function update(s, t, from) {
    if (!Number.isFinite(t)) return;
    s.t = t;
    const kept = keptAt(s, t);
    s.dom.kept.textContent = String(kept);
    s.dom.share.textContent = s.n ? pct(kept / s.n) : "n/a";
    s.dom.summaryKept.textContent = String(kept);
    s.dom.summaryT.textContent = fmt(t);
    if (from !== "number") s.dom.number.value = t.toFixed(4);
    if (from !== "range") s.dom.range.value = String(Math.min(s.max, Math.max(s.min, t)));
    if (from !== "keep") s.dom.keep.value = s.n ? (100 * kept / s.n).toFixed(1) : "";
    drawHist(s);
    fillCards(s.dom.lowest, s.bands.lowest || [], t);
    fillCards(s.dom.middle, aroundThreshold(s), t);
    fillCards(s.dom.highest, s.bands.highest || [], t);
    const sel = {};
    for (const o of Object.values(state)) if (o.n) sel[o.source] = { threshold: o.t, kept: keptAt(o, o.t), total: o.n };
    document.getElementById("selection").textContent = JSON.stringify(sel, null, 2);
  }

  function buildSource(src) {
    const sec = document.getElementById("source-" + src.slug);
    const s = { source: src.source, slug: src.slug, n: src.n_ok, min: src.min, max: src.max, bands: src.bands,
      fine_hist: src.fine_hist, fine_edges: src.fine_edges, scores: src.scores_b64 ? decodeScores(src.scores_b64) : null,
      dom: { summaryKept: document.getElementById("summary-kept-" + src.slug),
             summaryT: document.getElementById("summary-threshold-" + src.slug) } };
    if (!src.n_ok) {
      sec.appendChild(el("p", { class: "muted", "data-testid": "no-scores-" + src.slug },
        "No ok scores for this source yet: nothing to threshold."));
      return;
    }
    state[src.source] = s;
    s.hist = histogram(s, 40);
    const ctl = el("div", { class: "controls" });
    const step = s.max > s.min ? ((s.max - s.min) / 1000).toPrecision(3) : "0.001";
    s.dom.range = el("input", { type: "range", min: s.min, max: s.max, step: step,
      id: "threshold-range-" + src.slug, "data-testid": "threshold-range-" + src.slug, "aria-label": "threshold" });
    s.dom.number = el("input", { type: "number", step: "any", id: "threshold-input-" + src.slug,
      "data-testid": "threshold-input-" + src.slug, "aria-label": "threshold value" });
    s.dom.keep = el("input", { type: "number", min: "0.1", max: "100", step: "any", id: "keep-input-" + src.slug,
      "data-testid": "keep-input-" + src.slug, "aria-label": "keep percent" });
    const lt = el("label", {}, "threshold "); lt.appendChild(s.dom.range); lt.appendChild(s.dom.number);
    const lk = el("label", {}, "keep % "); lk.appendChild(s.dom.keep);
    const kept = el("span", { class: "kept-total" }, "kept ");
    s.dom.kept = el("span", { id: "kept-count-" + src.slug, "data-testid": "kept-count-" + src.slug });
    s.dom.share = el("span", { id: "kept-share-" + src.slug, "data-testid": "kept-share-" + src.slug });
    kept.appendChild(s.dom.kept); kept.appendChild(document.createTextNode(" of " + src.n_ok + " ("));
    kept.appendChild(s.dom.share); kept.appendChild(document.createTextNode(")"));
    ctl.append(lt, lk, kept);
    if (src.default_threshold !== null) {
      const reset = el("button", { type: "button", "data-testid": "reset-" + src.slug },
        "reset to keep " + pct(DATA.keep_fraction));
      reset.addEventListener("click", () => update(s, src.default_threshold, "reset"));
      ctl.appendChild(reset);
    }
    sec.appendChild(ctl);
    sec.appendChild(el("p", { class: "muted" }, src.exact
      ? "Kept counts are exact: all " + src.n_ok + " ok scores are embedded."
      : "Kept counts are estimates: " + src.n_ok + " ok scores are embedded as a " + src.fine_hist.length +
        "-bin histogram (exact at bin edges)."));
    s.dom.svg = svg("svg", { class: "hist", viewBox: "0 0 640 160", width: "640", height: "160",
      "data-testid": "histogram-" + src.slug });
    sec.appendChild(s.dom.svg);
    for (const [key, title] of [["lowest", "Lowest scores"], ["middle", "Around the threshold"],
                                ["highest", "Highest scores"]]) {
      sec.appendChild(el("h4", { class: "band" }, title));
      s.dom[key] = el("div", { class: "cards", "data-testid": "band-" + key + "-" + src.slug });
      sec.appendChild(s.dom[key]);
    }
    s.dom.range.addEventListener("input", () => update(s, parseFloat(s.dom.range.value), "range"));
    s.dom.number.addEventListener("input", () => update(s, parseFloat(s.dom.number.value), "number"));
    s.dom.keep.addEventListener("change", () => {
      const k = parseFloat(s.dom.keep.value) / 100;
      if (k > 0 && k <= 1) update(s, thresholdFor(s, k), "keep");
    });
    update(s, src.default_threshold !== null ? src.default_threshold : thresholdFor(s, DATA.keep_fraction), "init");
  }

  for (const src of DATA.sources) buildSource(src);
  document.body.setAttribute("data-ready", "1");
})();
