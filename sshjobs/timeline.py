"""A trace drawn as one self-contained HTML page (``sshjobs timeline run.json -o run.html``).

It reads a Chrome trace (``sshjobs.trace``'s, or any with complete events, such as
``ray timeline``'s) and lays it out here: one row per host slot (a process's thread), the
host's own row above its slots (connects, reconnects, installs), each job a bar coloured by
its outcome.  The page holds that layout as JSON and a small inline script that draws it as
SVG (a ``<title>`` per bar, and a details line, say what the bar is); no network, no files
beside it.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import NamedTuple

from .trace import load

OUTCOMES = ("ok", "failed", "timeout")
SETUP = ("connect", "worker", "install", "reconnect")  # categories drawn in their own colour; the rest are jobs
_BY_CNAME = {"good": "ok", "bad": "failed", "terrible": "timeout"}


class Drawn(NamedTuple):
    """What a page shows: job bars, rows (host slots) and hosts."""

    jobs: int
    rows: int
    hosts: int


def outcome(event: dict) -> str:
    args = event.get("args") if isinstance(event.get("args"), dict) else {}
    found = args.get("outcome") or _BY_CNAME.get(event.get("cname", ""))
    return found if found in OUTCOMES else "ok"


def kind(event: dict) -> str:
    cat = event.get("cat")
    return cat if cat in SETUP else "job"


def _seconds(us: float) -> str:
    s = us / 1e6
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _tip(event: dict, host: str, row: str) -> str:
    """A bar's hover text: what it was, where, how long, how it ended."""
    args = event.get("args") if isinstance(event.get("args"), dict) else {}
    what = kind(event)
    lines = [str(event.get("name", what)) if what == "job" else what]
    if what == "job" and "items" in args:
        lines.append(f"items {args['items'][0]}..{args['items'][1] - 1} ({args.get('ok', 0)} ok,"
                     f" {args.get('failed', 0)} failed)")
    elif what == "job" and "job" in args:
        lines.append(f"job {args['job']}")
    lines.append(f"{host}, {row}")
    lines.append(f"{outcome(event)}, {_seconds(float(event.get('dur', 0)))}")
    for key in ("error", "message", "requirements", "python"):
        value = args.get(key)
        if value:
            text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            lines.append(f"{key}: {text[:300]}")
    return "\n".join(lines)


def layout(doc: dict) -> dict:
    """The page's data: rows in order (process, then thread, as their sort indices say) and
    bars ``[row, ts, dur, kind, outcome, tip]`` with times in microseconds from the first."""
    events = [e for e in doc.get("traceEvents", []) if isinstance(e, dict)]
    procs: dict = {}
    threads: dict = {}
    psort: dict = {}
    tsort: dict = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        args = e.get("args") if isinstance(e.get("args"), dict) else {}
        key = (e.get("pid"), e.get("tid"))
        if e.get("name") == "process_name":
            procs[e.get("pid")] = str(args.get("name"))
        elif e.get("name") == "thread_name":
            threads[key] = str(args.get("name"))
        elif e.get("name") == "process_sort_index":
            psort[e.get("pid")] = args.get("sort_index", 0)
        elif e.get("name") == "thread_sort_index":
            tsort[key] = args.get("sort_index", 0)
    timed = [e for e in events if e.get("ph") in ("X", "i", "I") and isinstance(e.get("ts"), (int, float))]
    keys = sorted({(e.get("pid"), e.get("tid")) for e in timed},
                  key=lambda k: (_num(psort.get(k[0], k[0])), str(k[0]), _num(tsort.get(k, k[1])), str(k[1])))
    rows = []
    index = {}
    for key in keys:
        index[key] = len(rows)
        host = procs.get(key[0], f"process {key[0]}")
        rows.append({"host": host, "label": threads.get(key, f"thread {key[1]}"), "first": not rows or
                     rows[-1]["host"] != host})
    t0 = min((e["ts"] for e in timed), default=0.0)
    bars, marks = [], []
    end = 0.0
    counts = {o: 0 for o in OUTCOMES}
    for e in timed:
        row = index[(e.get("pid"), e.get("tid"))]
        ts = float(e["ts"]) - t0
        if e["ph"] == "X":
            dur = max(0.0, float(e.get("dur") or 0))
            what, how = kind(e), outcome(e)
            if what == "job":
                counts[how] += 1
            bars.append([row, round(ts, 1), round(dur, 1), what, how,
                         _tip(e, rows[row]["host"], rows[row]["label"])])
            end = max(end, ts + dur)
        else:
            marks.append([row, round(ts, 1), str(e.get("name", "")), f"{e.get('name', '')}\n{rows[row]['host']}"
                          f" at {_seconds(ts)}"])
            end = max(end, ts)
    return {"rows": rows, "bars": bars, "marks": marks, "end": end, "counts": counts,
            "hosts": len({r["host"] for r in rows})}


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def render(doc: dict, title: str = "sshjobs timeline") -> tuple[str, Drawn]:
    """The page for a trace document, and what it shows."""
    data = layout(doc)
    counts = data["counts"]
    jobs = sum(counts.values())
    summary = (f"{data['hosts']} hosts, {len(data['rows'])} rows, {jobs} jobs: {counts['ok']} ok,"
               f" {counts['failed']} failed, {counts['timeout']} timed out; {_seconds(data['end'])}")
    # In a <script> element only "</" could end it early; escaped, the JSON reads the same.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace("&", "\\u0026")
    page = (_PAGE.replace("@TITLE@", html.escape(title)).replace("@SUMMARY@", html.escape(summary))
            .replace("@DATA@", payload))
    return page, Drawn(jobs, len(data["rows"]), data["hosts"])


def write_html(trace: str | os.PathLike, out: str | os.PathLike) -> Drawn:
    """Read a trace file, write its page to ``out``; what the page shows."""
    page, drawn = render(load(trace), title=f"sshjobs timeline: {Path(trace).name}")
    Path(out).write_text(page, encoding="utf-8")
    return drawn


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>@TITLE@</title>
<style>
  body { font: 13px system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
  h1 { font-size: 16px; margin: 0 0 4px; }
  #summary { color: #555; margin-bottom: 8px; }
  #legend span { display: inline-block; margin-right: 14px; }
  #legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -2px; }
  #controls { margin: 8px 0; }
  #chart { overflow-x: auto; border: 1px solid #ddd; }
  #details { white-space: pre-wrap; font-family: ui-monospace, monospace; min-height: 5em; margin-top: 8px;
             padding: 6px; background: #f6f6f6; border: 1px solid #e4e4e4; }
  .bar { stroke-width: 0; } .bar:hover { stroke: #000; stroke-width: 1.5; }
  .bar.job.ok { fill: #3a9e5c; } .bar.job.failed { fill: #d64545; } .bar.job.timeout { fill: #e8a33d; }
  .bar.connect { fill: #5b8fd6; } .bar.worker { fill: #a8b4d8; } .bar.install { fill: #9b6cc0; }
  .bar.reconnect { fill: #d6c23a; }
  .bar.failed:not(.job) { stroke: #d64545; stroke-width: 2; } .bar.timeout:not(.job) { stroke: #e8a33d; stroke-width: 2; }
  .mark { fill: #222; }
  .label { font-size: 11px; fill: #333; } .label.host { font-weight: 600; }
  .tick { stroke: #e6e6e6; } .ticklabel { font-size: 10px; fill: #777; }
  .sep { stroke: #bbb; }
</style>
</head>
<body>
<h1>@TITLE@</h1>
<div id="summary">@SUMMARY@</div>
<div id="legend">
  <span><i style="background:#3a9e5c"></i>job ok</span><span><i style="background:#d64545"></i>job failed</span>
  <span><i style="background:#e8a33d"></i>job timed out</span><span><i style="background:#5b8fd6"></i>connect</span>
  <span><i style="background:#a8b4d8"></i>worker start</span><span><i style="background:#9b6cc0"></i>install</span>
  <span><i style="background:#d6c23a"></i>reconnect</span>
</div>
<div id="controls"><label>zoom <input id="zoom" type="range" min="1" max="40" value="1"></label></div>
<div id="chart"><noscript>This page draws the timeline with JavaScript.</noscript></div>
<div id="details">Hover over a bar for its job, host and duration.</div>
<script type="application/json" id="data">@DATA@</script>
<script>
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("data").textContent);
  var NS = "http://www.w3.org/2000/svg", LABEL = 170, ROW = 18, GAP = 4, TOP = 24;
  var chart = document.getElementById("chart"), details = document.getElementById("details");
  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function seconds(us) {
    if (!us) return "0";
    var s = us / 1e6;
    if (s >= 1) return s.toFixed(s >= 100 ? 0 : 2) + " s";
    return s >= 1e-3 ? (s * 1e3).toFixed(1) + " ms" : (s * 1e6).toFixed(0) + " \\u00b5s";
  }
  function step(span, pixels) {  // a tick every 1, 2 or 5 x 10^k microseconds, about 90 px apart
    var raw = span / Math.max(1, pixels / 90), p = Math.pow(10, Math.floor(Math.log10(raw || 1)));
    return [1, 2, 5, 10].map(function (m) { return m * p; }).find(function (s) { return s >= raw; });
  }
  function draw(zoom) {
    chart.textContent = "";
    var width = Math.max(400, (chart.clientWidth || window.innerWidth - 40) - LABEL - 20) * zoom;
    var span = data.end || 1, x = function (t) { return LABEL + t / span * width; };
    var height = TOP + data.rows.length * (ROW + GAP) + 8;
    var svg = el("svg", {width: LABEL + width + 20, height: height, id: "timeline"}, chart);
    var tick = step(span, width);
    for (var t = 0; t <= span + 1e-9; t += tick) {
      el("line", {x1: x(t), x2: x(t), y1: TOP - 4, y2: height, "class": "tick"}, svg);
      el("text", {x: x(t) + 2, y: TOP - 8, "class": "ticklabel"}, svg).textContent = seconds(t);
    }
    data.rows.forEach(function (r, i) {
      var y = TOP + i * (ROW + GAP);
      if (r.first && i) el("line", {x1: 0, x2: LABEL + width, y1: y - GAP / 2, y2: y - GAP / 2, "class": "sep"}, svg);
      var label = el("text", {x: 4, y: y + ROW - 5, "class": r.first ? "label host" : "label"}, svg);
      label.textContent = (r.first ? r.host + "  " : "") + r.label;
    });
    data.bars.forEach(function (b) {
      var y = TOP + b[0] * (ROW + GAP);
      var w = b[2] / span * width;  // a pixel apart from the next bar, once there is room for it
      var rect = el("rect", {x: x(b[1]), y: y, width: Math.max(1, w > 3 ? w - 1 : w), height: ROW,
                             "class": "bar " + b[3] + " " + b[4], "data-tip": b[5]}, svg);
      el("title", {}, rect).textContent = b[5];
    });
    data.marks.forEach(function (m) {
      var y = TOP + m[0] * (ROW + GAP), cx = x(m[1]);
      var p = el("path", {d: "M" + cx + " " + y + "l4 " + ROW / 2 + "l-4 " + ROW / 2 + "l-4 -" + ROW / 2 + "z",
                          "class": "mark", "data-tip": m[3]}, svg);
      el("title", {}, p).textContent = m[3];
    });
  }
  chart.addEventListener("mouseover", function (ev) {
    var tip = ev.target.getAttribute && ev.target.getAttribute("data-tip");
    if (tip) details.textContent = tip;
  });
  var zoom = document.getElementById("zoom");
  zoom.addEventListener("input", function () { draw(Number(zoom.value)); });
  draw(1);
})();
</script>
</body>
</html>
"""
