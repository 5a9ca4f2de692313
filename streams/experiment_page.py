"""The experiments page of the worker's web server (``/experiments``).

One self-contained HTML document: a little inline JavaScript reads ``/experiments.json``
(the report of :mod:`engine.experiment_report`) every few seconds and draws, per
experiment, the variants' numbers, the comparisons (lift with its interval, the sequential
verdict, guardrails), the sample-ratio check, interleaving results, and one SVG chart per
metric with a line per variant. Nothing is loaded from elsewhere: it works offline.
"""

from __future__ import annotations

REFRESH_MS = 3000

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>streamrank experiments</title>
<style>
body{font:14px system-ui,sans-serif;margin:20px;color:#222}
table{border-collapse:collapse;margin:6px 0 12px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #ddd;background:#fff}
.ok{color:#1a7f37}.bad{color:#c0392b;font-weight:bold}.note{color:#666}
</style></head>
<body><h1>streamrank experiments</h1>
<div id="status" class="note">loading…</div><div id="experiments"></div>
<script>
const COLORS=["#1f77b4","#d62728","#2ca02c","#9467bd","#ff7f0e","#8c564b"];
const ROWS=[["users","users",0],["requests","requests",0],["impressions","impressions",0],
["clicks","clicks",0],["ctr","CTR (clicks/search)",4],["ctr_at_k","CTR@k",4],["mrr","MRR",4],
["add_to_carts","add-to-carts",0],["purchases","purchases",0],
["revenue_per_request","revenue/search",3],["latency_ms","latency ms",3]];
function fmt(x,d){return x===null||x===undefined?"–":(d?Number(x).toFixed(d):String(x));}
function pct(x){return x===null||x===undefined?"–":(x>=0?"+":"")+(100*x).toFixed(1)+"%";}
function el(tag,attrs,text){const e=document.createElement(tag);
 for(const k in attrs||{})e.setAttribute(k,attrs[k]);if(text!==undefined)e.textContent=text;
 return e;}
function chart(name,series,t){
 const W=360,H=180,P=34,NS="http://www.w3.org/2000/svg";
 const svg=document.createElementNS(NS,"svg");
 svg.setAttribute("width",W);svg.setAttribute("height",H);svg.setAttribute("class","chart");
 svg.setAttribute("data-metric",name);
 const vals=[];for(const v in series)for(const y of series[v])if(y!==null)vals.push(y);
 const title=document.createElementNS(NS,"text");title.setAttribute("x",P);
 title.setAttribute("y",14);title.textContent=name;svg.appendChild(title);
 if(!vals.length||t.length<1)return svg;
 let lo=Math.min(...vals),hi=Math.max(...vals);if(hi===lo){hi+=1e-9;lo-=1e-9;}
 const t0=t[0],t1=Math.max(t[t.length-1],t0+1);
 const X=x=>P+(W-P-8)*(x-t0)/(t1-t0),Y=y=>H-20-(H-44)*(y-lo)/(hi-lo);
 for(const [y,label] of [[lo,fmt(lo,3)],[hi,fmt(hi,3)]]){
  const l=document.createElementNS(NS,"text");l.setAttribute("x",2);l.setAttribute("y",Y(y)+4);
  l.setAttribute("font-size","10");l.textContent=label;svg.appendChild(l);}
 let i=0;for(const v in series){
  const pts=series[v].map((y,n)=>y===null?null:X(t[n]).toFixed(1)+","+Y(y).toFixed(1))
   .filter(p=>p!==null);
  const line=document.createElementNS(NS,"polyline");line.setAttribute("points",pts.join(" "));
  line.setAttribute("fill","none");line.setAttribute("stroke",COLORS[i%COLORS.length]);
  line.setAttribute("stroke-width","2");line.setAttribute("data-variant",v);
  line.setAttribute("data-points",String(pts.length));svg.appendChild(line);
  const key=document.createElementNS(NS,"text");key.setAttribute("x",W-90);
  key.setAttribute("y",28+12*i);key.setAttribute("font-size","10");
  key.setAttribute("fill",COLORS[i%COLORS.length]);key.textContent=v;svg.appendChild(key);i++;}
 return svg;}
function render(report){
 const root=document.getElementById("experiments");root.textContent="";
 for(const e of report.experiments){
  const sec=el("section",{"class":"experiment","data-experiment":e.name});
  sec.appendChild(el("h2",{},e.name+" (layer "+e.layer+", primary "+e.primary_metric+
   (e.running?"":", not running")+")"));
  const names=Object.keys(e.variants);const table=el("table",{"class":"variants"});
  const head=el("tr");head.appendChild(el("th",{},"metric"));
  for(const n of names)head.appendChild(el("th",{},n));table.appendChild(head);
  for(const [key,label,d] of ROWS){const tr=el("tr");tr.appendChild(el("td",{},label));
   for(const n of names)tr.appendChild(el("td",{"class":"value","data-variant":n,
    "data-metric":key},fmt(e.variants[n][key],d)));table.appendChild(tr);}
  sec.appendChild(table);
  for(const c of e.comparisons){const f=c.fixed_horizon,s=c.sequential;
   const p=el("p",{"class":"comparison","data-variant":c.variant});
   p.textContent=c.variant+" vs "+c.control+" on "+c.metric+": lift "+pct(f.lift)+
    " (95% CI "+pct(f.lift_ci[0])+" to "+pct(f.lift_ci[1])+"), difference "+
    fmt(f.difference,4)+"; sequential: "+s.verdict+" (always-valid p="+fmt(s.p_value,4)+")";
   const v=el("span",{"class":"verdict "+(s.decided?"ok":"note"),"data-variant":c.variant},
    " ["+s.verdict+"]");p.appendChild(v);sec.appendChild(p);
   for(const g of c.guardrails){sec.appendChild(el("p",{"class":"guardrail "+
    (g.status==="breached"?"bad":"note"),"data-metric":g.metric},"guardrail "+g.metric+": "+
    g.status+" (lift "+pct(g.lift)+")"));}}
  if(e.srm){sec.appendChild(el("p",{"class":"srm "+(e.srm.flagged?"bad":"ok")},
   "sample ratio: users "+e.srm.users.join(" / ")+" (expected "+e.srm.expected.join(" / ")+
   "), p="+fmt(e.srm.p_value,4)+(e.srm.flagged?" MISMATCH":" ok")));}
  for(const il of e.interleaving){sec.appendChild(el("p",{"class":"interleaving",
   "data-variant":il.variant},"interleaving "+il.a+" vs "+il.b+": wins "+il.wins_a+" : "+
   il.wins_b+", ties "+il.ties+", p="+fmt(il.p_value,4)+": "+il.verdict));}
  const charts=el("div",{"class":"charts"});
  for(const m in e.series.metrics)charts.appendChild(chart(m,e.series.metrics[m],e.series.t));
  sec.appendChild(charts);
  sec.appendChild(el("p",{"class":"note"},"cumulative value per "+e.series.bucket_s+
   " s bucket over the last hour"));
  root.appendChild(sec);}
 document.getElementById("status").textContent="updated "+
  new Date(report.generated_at*1000).toISOString();
 document.body.setAttribute("data-rendered","1");}
async function refresh(){try{const r=await fetch("/experiments.json",{cache:"no-store"});
 render(await r.json());}catch(err){document.getElementById("status").textContent=
 "cannot read /experiments.json: "+err;}}
refresh();setInterval(refresh,__REFRESH__);
</script></body></html>
"""


def experiment_page_html() -> str:
    """The page; all of its data comes from ``/experiments.json``."""
    return _PAGE.replace("__REFRESH__", str(REFRESH_MS))
